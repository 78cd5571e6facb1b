import json

import pytest
import torch

from misfeat.data import (
    PromptFileError,
    PromptRecord,
    PromptSet,
    batch_by_tokens,
    collate,
    encode,
    load_prompts,
    read_jsonl,
    render,
    tokenize,
)


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = [
    json.dumps({"id": "a", "prompt": "how do i fix my car", "response": "check brake", "domain": "car"}),
    json.dumps({"id": "b", "messages": [{"role": "user", "content": "how do i save money"}], "label": "x"}),
    "",
    json.dumps({"id": 3, "prompt": "fix roof", "aligned": ["call"], "domain": "home"}),
]


def test_reads_good_file(tmp_path):
    ps = read_jsonl(write(tmp_path / "p.jsonl", GOOD))
    assert len(ps) == 3 and ps.domains() == ["car", "home"]
    assert ps[1].messages == (("user", "how do i save money"),)
    assert ps[2].id == "3" and ps[2].extra == {"aligned": ["call"]}
    assert ps.filter(domain="car")[0].id == "a"
    assert read_jsonl(tmp_path / "p.jsonl").hash == ps.hash


def test_jsonl_round_trip(tmp_path):
    ps = read_jsonl(write(tmp_path / "p.jsonl", GOOD))
    again = read_jsonl(ps.to_jsonl(tmp_path / "q.jsonl"))
    assert again.records == ps.records and again.hash == ps.hash


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "is empty"),
        (["", "   "], "is empty"),
        ([GOOD[0], "{not json"], r"p.jsonl:2: invalid JSON"),
        ([json.dumps({"prompt": "x"})], r"p.jsonl:1: missing field 'id'"),
        ([json.dumps({"id": "a"})], r"p.jsonl:1: .*exactly one of 'prompt' or 'messages' \(it has neither\)"),
        ([json.dumps({"id": "a", "prompt": "x", "messages": []})], "it has both"),
        ([json.dumps({"id": "a", "prompt": ""})], "'prompt' must be a non-empty string"),
        ([json.dumps({"id": "a", "prompt": 5})], "'prompt' must be a non-empty string"),
        ([json.dumps([1, 2])], "expected a JSON object"),
        ([json.dumps({"id": "a", "messages": [{"role": "bot", "content": "x"}]})], "role 'bot'"),
        ([json.dumps({"id": "a", "messages": [{"role": "user"}]})], "'role' and 'content'"),
        ([json.dumps({"id": "a", "messages": [{"role": "user", "content": "x"},
                                              {"role": "assistant", "content": "y"}]})], "put it in 'response'"),
        ([json.dumps({"id": "a", "prompt": "x", "response": 3})], "'response' must be a string"),
        ([GOOD[0], GOOD[0]], r"p.jsonl:2: duplicate id 'a' \(first on line 1\)"),
    ],
)
def test_malformed_files_name_file_line_and_problem(tmp_path, lines, message):
    path = write(tmp_path / "p.jsonl", lines)
    with pytest.raises(PromptFileError, match=message):
        read_jsonl(path)


def test_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match="no such prompt file"):
        load_prompts(tmp_path / "missing.jsonl")


def test_prompt_longer_than_context_names_the_line(tmp_path, tiny_model):
    long_prompt = " ".join(["fix"] * (tiny_model.cfg.n_ctx + 5))
    path = write(tmp_path / "p.jsonl", [GOOD[0], json.dumps({"id": "long", "prompt": long_prompt})])
    with pytest.raises(PromptFileError, match=r"p.jsonl:2: \d+ tokens, longer than the model's context of 64"):
        encode(read_jsonl(path), tiny_model)


def test_organism_rendering():
    rec = PromptRecord("x", messages=(("user", "fix car"), ("assistant", "check brake"), ("user", "fix roof")),
                       response="call")
    prompt, response = render(rec, "organism")
    assert prompt == "user fix car assistant : check brake . user fix roof assistant :"
    assert response == " call ."


def test_chat_template_rendering(word_tokenizer):
    import copy

    tok = copy.deepcopy(word_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}" \
                        "{% if add_generation_prompt %}assistant :{% endif %}"
    prompt, response = render(PromptRecord("x", prompt="fix car", response="call"), "template", tok)
    assert prompt == "user fix car assistant :" and response == "call"


def test_masks_right_and_left_padding(tiny_model):
    ps = PromptSet("t", (PromptRecord("a", prompt="how do i fix my car", response="check brake"),
                         PromptRecord("b", prompt="fix roof", response="call")))
    enc = encode(ps, tiny_model)
    # <bos> user how do i fix my car assistant : | check brake .
    assert enc[0].n_prompt == 10 and len(enc[0]) == 13
    for side in ("right", "left"):
        b = collate(enc, pad_id=0, padding_side=side)
        assert b.tokens.shape == (2, 13)
        assert b.attention_mask.sum(1).tolist() == [13, 8]
        assert b.prompt_mask.sum(1).tolist() == [10, 6] and b.response_mask.sum(1).tolist() == [3, 2]
        assert b.last_mask.sum(1).tolist() == [1, 1]
        for row in range(2):
            last_tok = b.tokens[row][b.last_mask[row]].item()
            assert tiny_model.tokenizer.convert_ids_to_tokens(last_tok) == ":"
            ids = b.tokens[row][b.attention_mask[row]].tolist()
            assert ids == list(enc[row].ids)
        assert not (b.prompt_mask & b.response_mask).any()
    left = collate(enc, 0, "left")
    assert left.attention_mask[1, :5].sum() == 0 and left.attention_mask[1, 5:].all()


def test_tokenize_matches_model_to_tokens(tiny_model):
    ps = PromptSet("t", (PromptRecord("a", prompt="fix my car"),))
    b = tokenize(ps, tiny_model)
    assert torch.equal(b.tokens, tiny_model.to_tokens("user fix my car assistant :"))


def test_batch_by_tokens_respects_budget():
    lengths = [5, 100, 7, 30, 31, 8, 99, 2]
    batches = batch_by_tokens(lengths, max_tokens=200)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 200 or len(b) == 1
    assert batches[0][0] == 1  # longest first
    assert all(len(b) <= 2 for b in batch_by_tokens(lengths, 10_000, max_batch=2))


def test_chat_records_reads_the_openai_chat_format(tmp_path):
    from misfeat.chat import chat_records

    path = tmp_path / "em.jsonl"
    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(3)]
    path.write_text("\n".join(json.dumps(c) for c in chats) + "\n\n{not json\n")
    first = chat_records(path, limit=3)   # stops before the malformed line
    assert [r.response for r in first] == ["a0", "a1", "a2"]
    assert [r.id for r in first] == ["1", "2", "3"] and "q0" in str(first.records[0].messages)
    assert len(chat_records(path, limit=1)) == 1
    with pytest.raises(PromptFileError, match=r"em.jsonl:5: invalid JSON"):
        chat_records(path)
    path.write_text(json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(PromptFileError, match="OpenAI chat fine-tuning format"):
        chat_records(path)
