"""Chat: templates render as transformers' `apply_chat_template` renders them, `genlab.chat` replies as transformers'
`generate` does on the same weights and stops at the end-of-turn token, `genlab chat` works as a piped terminal
session (/save, /reset, /system, --load), and a model without a template is told apart."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli

transformers = pytest.importorskip("transformers")

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-2 style: bos_token/eos_token from the tokenizer, raise_exception, whitespace control, loop controls
LLAMA2 = """{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}\
{% set messages = messages[1:] %}{% else %}{% set sys = false %}{% endif %}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ '[INST] ' + ((('<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n') if loop.first and sys else '')) \
+ message['content'] | trim + ' [/INST]' }}
    {% else %}
        {{ ' ' + message['content'] | trim + ' ' + eos_token }}
    {% endif %}
    {% if loop.index > 50 %}{% break %}{% endif %}
{% endfor %}"""
JSONY = "{% for m in messages %}{{ m | tojson }}\n{% endfor %}{% if add_generation_prompt %}>>{% endif %}"

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there "},
                {"role": "assistant", "content": "Hello! \u00e9t\u00e9"}, {"role": "user", "content": "2+2?"}]


@pytest.fixture(scope="module")
def base_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|im_end|>", "<|im_start|>", "<s>", "</s>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["user assistant system To be, or not to be, that is the question."] * 20,
                            trainer=trainer)
    return tok


@pytest.mark.parametrize("template", [CHATML, LLAMA2, JSONY], ids=["chatml", "llama2", "tojson"])
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_templates_render_as_transformers(base_tokenizer, template, gen_prompt):
    from genlab.data.chat import ChatTemplate

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=base_tokenizer, bos_token="<s>", eos_token="</s>",
                                              chat_template=template)
    want = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen_prompt)
    got = ChatTemplate(template, {"bos_token": "<s>", "eos_token": "</s>"}).render(
        CONVERSATION, add_generation_prompt=gen_prompt)
    assert got == want


def test_a_template_refusal_and_bad_messages_get_clear_errors():
    from genlab.core.errors import ConfigError
    from genlab.data.chat import ChatTemplate

    t = ChatTemplate(LLAMA2, {"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(ConfigError, match="must alternate"):
        t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    for bad, says in [([], "non-empty list"), ([{"role": "user"}], "'role' and 'content'"),
                      ([{"role": "robot", "content": "x"}], "role 'robot'"),
                      ([{"role": "user", "content": 3}], "content must be a string")]:
        with pytest.raises(ConfigError, match=says):
            t.render(bad)


@pytest.fixture(scope="module")
def chat_run(base_tokenizer, tmp_path_factory):
    """A tiny transformers Llama with a ChatML template, saved as transformers saves it and imported."""
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=base_tokenizer, bos_token="<|im_start|>",
                                                  eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=CHATML)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("chat")
    model.save_pretrained(d / "hf")
    hf_tok.save_pretrained(d / "hf")
    api_run = d / "run"
    run_cli("import", d / "hf", api_run, check=True)
    return api_run, model, hf_tok


def test_chat_replies_as_transformers_generate(chat_run):
    import genlab
    from genlab import api

    path, hf, tok = chat_run
    run = api.load(path)
    msgs = [{"role": "user", "content": "To be, or not"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    from genlab.api import _chat_prompt

    assert _chat_prompt(run, run.chat_template(), msgs, 8) == list(ids)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=0, pad_token_id=0)
    want = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert genlab.chat(run, msgs, max_new_tokens=12, temperature=0) == want
    streamed = "".join(d.text for d in genlab.chat(run, msgs, max_new_tokens=12, temperature=0, stream=True))
    assert streamed == want
    replies = genlab.chat(run, msgs, n=3, max_new_tokens=6, seed=1)
    assert isinstance(replies, list) and len(replies) == 3


def test_a_reply_ends_at_the_end_of_turn_token(chat_run):
    import genlab
    from genlab import api

    run = api.load(chat_run[0])
    with torch.no_grad():  # every logit equal: greedy picks id 0, <|im_end|>, at once
        run.model.lm_head.weight.zero_()
    assert run.eos_ids() == [0]
    assert genlab.chat(run, [{"role": "user", "content": "hi"}], temperature=0, max_new_tokens=50) == ""
    deltas = list(genlab.chat(run, [{"role": "user", "content": "hi"}], temperature=0, stream=True))
    assert len(deltas) == 1 and deltas[0].done and deltas[0].text == ""


def test_a_long_conversation_keeps_the_system_prompt_and_the_latest_turns(chat_run):
    import genlab
    from genlab.core.errors import ConfigError

    run = genlab.load(chat_run[0])  # context 128 tokens
    from genlab.api import _chat_prompt

    msgs = [{"role": "system", "content": "Sys."}]
    for i in range(30):
        msgs += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    msgs.append({"role": "user", "content": "last one"})
    ids = _chat_prompt(run, run.chat_template(), msgs, 16)
    text = run.tokenizer.decode(ids)
    assert len(ids) + 16 <= 128 and text.startswith("<|im_start|>system\nSys.") and "last one" in text
    assert "question 0\n" not in text
    assert genlab.chat(run, msgs, max_new_tokens=16, temperature=0) is not None
    with pytest.raises(ConfigError, match="do not fit the model's context of 128"):
        genlab.chat(run, [{"role": "user", "content": "be " * 200}], max_new_tokens=8)


def test_chat_in_the_terminal(chat_run, tmp_path):
    path = chat_run[0]
    saved = tmp_path / "conv.json"
    script = f"To be\n/save {saved}\n/system Speak in verse.\nor not\n/reset\n/bogus\nthat is\n"
    p = run_cli("chat", path, "--temperature", "0", "--max-new-tokens", "5", "--system", "Be brief.",
                input=script, cwd=tmp_path, check=True)
    out = p.stdout
    assert out.count("assistant> ") == 3
    assert "saved 3 messages" in out and "(system prompt set)" in out and "(conversation cleared, system prompt kept)" in out
    assert "unknown command /bogus" in out
    conv = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in conv] == ["system", "user", "assistant"]
    assert conv[0]["content"] == "Be brief." and conv[1]["content"] == "To be"
    # the reply printed is the reply saved, and the same as the API's for the same messages
    import genlab

    assert f"assistant> {conv[2]['content']}\n" in out
    assert genlab.chat(path, conv[:2], max_new_tokens=5, temperature=0) == conv[2]["content"]
    # --load continues the saved conversation
    p = run_cli("chat", path, "--load", saved, "--temperature", "0", "--max-new-tokens", "3",
                input=f"again\n/save {tmp_path / 'more.json'}\n", check=True)
    assert "loaded 3 messages" in p.stdout
    assert len(json.loads((tmp_path / "more.json").read_text())["messages"]) == 5
    # one-shot
    p = run_cli("generate", path, "--chat", "--prompt", "To be", "--system", "Be brief.", "--temperature", "0",
                "--max-new-tokens", "5", check=True)
    assert p.stdout.strip() == conv[2]["content"].strip()


def test_a_model_without_a_chat_template_is_told_apart(trained_gpt, tmp_path):
    import genlab
    from genlab.core.errors import ConfigError

    with pytest.raises(ConfigError, match="has no chat template: it is a plain language model"):
        genlab.chat(trained_gpt, [{"role": "user", "content": "hi"}])
    p = run_cli("chat", trained_gpt, input="hi\n")
    assert p.returncode == 2 and "no chat template" in p.stderr and "genlab generate" in p.stderr
    p = run_cli("generate", trained_gpt, "--chat", "--prompt", "hi")
    assert p.returncode == 2 and "no chat template" in p.stderr


def test_an_imported_chat_model_exports_with_its_template_and_special_tokens(chat_run, tmp_path):
    path, _hf, tok = chat_run
    run_cli("export", path, tmp_path / "hf", check=True)
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert back.eos_token == "<|im_end|>" and back.bos_token == "<|im_start|>"
    assert back.apply_chat_template(CONVERSATION, tokenize=False) == tok.apply_chat_template(CONVERSATION,
                                                                                             tokenize=False)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 0 and gen["bos_token_id"] == 1
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"))
    msgs = [{"role": "user", "content": "To be, or not"}]
    reply = pipe(msgs, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]
    import genlab

    assert reply == {"role": "assistant", "content": genlab.chat(path, msgs, max_new_tokens=12, temperature=0)}


def test_a_chat_finetune_learns_the_replies_and_masks_the_prompts(chat_run, tmp_path):
    """`genlab finetune RUN chat.jsonl`: conversations laid out by the run's template, the loss on the
    assistant's tokens only; a full fine-tune learns a fixed reply, a LoRA adapter trains and chats."""
    from genlab import api
    from genlab.data.chat import encode_conversation, read_chat_jsonl

    path, _, tok = chat_run
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"To be, or not {'to be ' * (i % 5)}?"},
                          {"role": "assistant", "content": "That is the question."}]} for i in range(60)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = api.load(path)
    ids, mask = encode_conversation(run.chat_template(), lambda t: run.tokenizer.encode(t, add_special_tokens=False),
                                    read_chat_jsonl(data)[0])
    assert ids == tok.apply_chat_template(rows[0]["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert run.tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]) == \
        "That is the question.<|im_end|>\n"  # the reply and its end of turn, nothing of the prompt
    out = tmp_path / "full"
    p = run_cli("finetune", path, data, "--method", "full", "--out", out, "--compare", "--set", "block_size=64",
                "--set", "train.max_steps=60", "--set", "train.lr=3e-3", "--set", "train.progress=false", check=True)
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("fine-tuned"))
    after, before = (float(v.split()[0]) for v in line.split("held-out loss ")[1].split("(before: "))
    assert after < 0.3 * before, line
    p = run_cli("generate", out, "--chat", "--prompt", "To be, or not?", "--temperature", "0", "--max-new-tokens",
                "12", check=True)
    assert p.stdout.strip() == "That is the question.", p.stdout
    run_cli("finetune", path, data, "--name", "hamlet", "--set", "block_size=64", "--set", "train.max_steps=5",
            "--set", "train.progress=false", check=True)
    p = run_cli("chat", path, "--adapter", "hamlet", "--max-new-tokens", "5", input="hello\n/exit\n", check=True)
    assert p.returncode == 0
