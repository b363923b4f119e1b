"""Chat prompts in the engine: rendered exactly as transformers' ``apply_chat_template`` renders them (the
checkpoint's template, or the adapter directory's own), greedy output equal to transformers / PEFT ``generate``
on those ids, the template's end-of-turn token ending the request, and refusals that name the field."""
from __future__ import annotations

import pytest
import torch

from engine import LLMEngine
from engine.chat import ChatMessage, ChatPrompt, ChatTemplates, chat_prompt
from engine.request_state import RequestState
from engine.sampler import SampleResult
from engine.scheduling.errors import RequestError
from engine.scheduling.request import FinishReason, Request
from engine.scheduling.sampling_params import SamplingParams
from tests.helpers.adapters import make_peft_adapter
from tests.helpers.tiny_models import hf_model, make_checkpoint

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]
# An adapter's own template: a different layout, ending each turn with <pad> (id 3) instead of </s>.
ADAPTER_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<pad>{% endfor %}"
                    "{% if add_generation_prompt %}[assistant] {% endif %}")
NEW = 10


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    base = make_checkpoint(str(root / "base"), "llama", max_position_embeddings=256)
    plain = make_checkpoint(str(root / "plain"), "llama", chat_template=None)
    ads = root / "adapters"
    make_peft_adapter(base, str(ads / "a1"), seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    make_peft_adapter(base, str(ads / "own"), seed=2, r=4, lora_alpha=8, target_modules=["o_proj"])
    (ads / "own" / "chat_template.jinja").write_text(ADAPTER_TEMPLATE)
    return {"base": base, "plain": plain, "adapters": str(ads)}


@pytest.fixture(scope="module")
def engine(assets):
    return LLMEngine(assets["base"], adapter_dir=assets["adapters"], progress=False, num_kv_blocks=64,
                     block_size=16, max_num_seqs=4)


def _hf_greedy(model, ids: list[int]) -> list[int]:
    with torch.inference_mode():
        x = torch.tensor([ids])  # an explicit mask: the adapter's template writes <pad> into the prompt
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=None, pad_token_id=3)
    return out[0, len(ids):].tolist()


def test_chat_prompt_renders_like_apply_chat_template_and_generates_like_transformers(engine, assets):
    tok = engine.tokenizer
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    rendered = engine.chat_templates.render(chat_prompt(MESSAGES), engine.max_prompt_chars)
    assert rendered.prompt_token_ids == list(ids)
    assert tok.decode(ids).endswith("</s>\n<s>assistant\n")  # the generation prompt is added
    assert rendered.end_of_turn_ids == (tok.convert_tokens_to_ids("</s>"),)

    params = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)
    [out] = engine.generate([chat_prompt(MESSAGES)], params)
    assert list(out.prompt_token_ids) == list(ids)
    assert list(out.token_ids) == _hf_greedy(hf_model(assets["base"]), list(ids))


def test_an_adapter_template_wins_for_its_requests_and_output_equals_peft(engine, assets):
    from peft import PeftModel

    tok = engine.tokenizer
    ids = tok.apply_chat_template(MESSAGES, chat_template=ADAPTER_TEMPLATE, add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    params = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)
    own, other = engine.generate([chat_prompt(MESSAGES)] * 2, [params] * 2, adapters=["own", "a1"])
    assert list(own.prompt_token_ids) == list(ids) and tok.decode(ids).startswith("[system] Be brief.<pad>")
    assert list(other.prompt_token_ids) == engine.chat_templates.render(chat_prompt(MESSAGES), 10**6).prompt_token_ids
    peft = PeftModel.from_pretrained(hf_model(assets["base"]), f"{assets['adapters']}/own").eval()
    assert list(own.token_ids) == _hf_greedy(peft, list(ids))
    assert ChatTemplates(tok).render(chat_prompt(MESSAGES), 10**6, f"{assets['adapters']}/own"
                                     ).end_of_turn_ids == (3,)


def test_the_end_of_turn_token_ends_a_chat_request_like_eos(engine):
    req = Request("r", [5, 6], SamplingParams(max_new_tokens=8))
    state = RequestState(req, engine.tokenizer, torch.device("cpu"), end_of_turn_ids=(3,))
    for token, expected in ((7, None), (3, FinishReason.EOS)):
        req.output_token_ids.append(token)
        assert state.on_token(SampleResult([token], [0.0], [None]), 0, (2,), 64, 0.0) == expected
    # min_new_tokens masks it like an EOS id
    from engine.sampler import Sampler, SamplingState

    st = SamplingState(SamplingParams(min_new_tokens=2, temperature=0.0), [5], [], end_of_turn_ids=(3,))
    logits = torch.zeros(1, 8)
    logits[0, 3] = 10.0
    assert Sampler()(logits, [st], (2,)).token_ids != [3]


@pytest.mark.parametrize(("messages", "field", "words"), [
    ([], "messages", "at least one message"),
    ([{"role": "robot", "content": "hi"}], "messages[0].role", "system, user, assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": 5}], "messages[1].content", "string"),
])
def test_bad_messages_are_refused_naming_the_message(engine, messages, field, words):
    with pytest.raises(RequestError) as e:
        engine.add_request(chat_prompt(messages))
    assert e.value.field == field and words in str(e.value)
    assert not engine.has_work() and engine.check_invariants()["tracked"] == 0  # nothing was queued


def test_a_model_without_a_chat_template_refuses_messages(assets):
    eng = LLMEngine(assets["plain"], progress=False, num_kv_blocks=16, block_size=16, max_num_seqs=2)
    with pytest.raises(RequestError, match="no chat template") as e:
        eng.add_request(ChatPrompt((ChatMessage("user", "hi"),)))
    assert e.value.field == "messages" and not eng.has_work()


def test_content_longer_than_the_context_can_hold_is_refused_before_rendering(engine):
    huge = [{"role": "user", "content": "x" * (engine.max_prompt_chars + 1)}]
    with pytest.raises(RequestError, match="can never fit") as e:
        engine.add_request(chat_prompt(huge))
    assert e.value.field == "messages"



def test_a_lone_surrogate_is_refused_as_not_unicode_text(engine):
    with pytest.raises(RequestError, match="lone surrogate") as e:
        engine.add_request("fox \ud800 dog")
    assert e.value.field == "prompt"
    with pytest.raises(RequestError, match="lone surrogate") as e:
        engine.add_request(chat_prompt([{"role": "user", "content": "\udfff"}]))
    assert e.value.field == "messages[0].content" and not engine.has_work()
