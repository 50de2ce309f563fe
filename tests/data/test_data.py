"""Data: formats, masking, truncation, bad input, and packing that restarts the Mamba state at
every document (checked against running the documents one by one)."""

import json

import datasets
import pytest
import torch

from mamba_ft import data as data_lib
from mamba_ft.errors import UserError
from mamba_ft.models import document_starts, load_model, load_tokenizer, resolve_source
from mamba_ft.recipe import DataSection, DataSource

IGNORE = data_lib.IGNORE


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_source("bundled:tokenizer"), "bundled tokenizer")


def section(fmt, **kw):
    return DataSection(format=fmt, train=DataSource(path="unused"), **kw)


def tokenize(rows, fmt, tokenizer, **kw):
    return data_lib.tokenize_rows(datasets.Dataset.from_list(rows), section(fmt, **kw), tokenizer, "train")


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_completion_loss_on_completion_only(tokenizer):
    out = tokenize([{"prompt": "Q: abc A:", "completion": " bca\n"}], "completion", tokenizer)
    row = out.dataset[0]
    prompt, answer = ids(tokenizer, "Q: abc A:"), ids(tokenizer, " bca\n") + [tokenizer.eos_token_id]
    assert row["input_ids"] == prompt + answer
    assert row["labels"] == [IGNORE] * len(prompt) + answer


def test_alpaca_template_and_mask(tokenizer):
    rows = [{"instruction": "Rotate.", "input": "abc", "output": "bca"},
            {"instruction": "Rotate.", "input": "", "output": "x"}]
    out = tokenize(rows, "alpaca", tokenizer, add_eos=False)
    for row, (prompt, answer) in zip(out.dataset, [
            ("### Instruction:\nRotate.\n\n### Input:\nabc\n\n### Response:\n", "bca"),
            ("### Instruction:\nRotate.\n\n### Response:\n", "x")]):
        assert row["input_ids"] == ids(tokenizer, prompt) + ids(tokenizer, answer)
        assert [t for t in row["labels"] if t != IGNORE] == ids(tokenizer, answer)


def test_chat_loss_on_assistant_turns_only(tokenizer):
    tokenizer = load_tokenizer(resolve_source("bundled:tokenizer"), "bundled tokenizer")
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "abc"}, {"role": "assistant", "content": "cba"}]
    row = tokenize([{"messages": messages}], "chat", tokenizer, add_eos=False).dataset[0]
    full = "<user>hi\n<assistant>yo\n<user>abc\n<assistant>cba\n"
    assert tokenizer.decode(row["input_ids"]) == full
    targets = tokenizer.decode([t for t in row["labels"] if t != IGNORE])
    assert targets == "yo\ncba\n"


def test_truncation_is_counted_and_empty_targets_dropped(tokenizer):
    rows = [{"text": "Q: abcdef A: fedcba\n"}, {"text": "Q: ab A: b\n"}]
    out = tokenize(rows, "text", tokenizer, max_length=8)
    assert out.n_truncated == 2 and all(len(r) == 8 for r in out.dataset["input_ids"])
    # A prompt longer than max_length leaves no target: the example is dropped; all dropped -> error.
    with pytest.raises(UserError, match="No train example has a target token"):
        tokenize([{"prompt": "Q: abcdef A:", "completion": " x"}], "completion", tokenizer, max_length=4)


def test_wrong_columns_name_found_and_expected(tokenizer):
    with pytest.raises(UserError) as info:
        tokenize([{"question": "a", "answer": "b"}], "completion", tokenizer)
    assert "expected columns prompt, completion" in str(info.value)
    assert "found question, answer" in str(info.value)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data_lib.load_rows(DataSource(path=str(tmp_path / "missing.jsonl")), "train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError):
        rows = data_lib.load_rows(DataSource(path=str(empty)), "train")
        data_lib.tokenize_rows(rows, section("text"), None, "train")


def test_local_files_load(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a", "b", "c"]))
    assert data_lib.load_rows(DataSource(path=str(path), limit=2), "train")["text"] == ["a", "b"]
    (tmp_path / "d.txt").write_text("one\ntwo\n")
    assert data_lib.load_rows(DataSource(path=str(tmp_path / "d.txt")), "train")["text"] == ["one", "two"]


def test_packed_batch_equals_documents_one_by_one(tokenizer):
    """Logits and loss of a packed row == each document run alone (state reset at boundaries)."""
    config = {"model_type": "mamba", "vocab_size": len(tokenizer), "hidden_size": 32, "state_size": 8,
              "num_hidden_layers": 2, "expand": 2, "conv_kernel": 4}
    model = load_model(config, need_tokenizer=False, seed=0).model.eval()
    texts = ["Q: abc A: cba\nQ: xyz A: zyx\n", "Q: hello A: h\n", "Q: mamba A: amabm\nQ: q A: q\n"]
    out = tokenize([{"text": t} for t in texts], "text", tokenizer, packing=True, max_length=64)
    assert len(out.dataset) == 1  # all three fit in one row
    batch = data_lib.collate(out.dataset[:], tokenizer.pad_token_id)
    with torch.no_grad(), document_starts(model, batch["document_starts"]):
        packed = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    pos, loss_alone = 0, 0.0
    for text in texts:
        doc = torch.tensor([ids(tokenizer, text) + [tokenizer.eos_token_id]])
        with torch.no_grad():
            alone = model(input_ids=doc, use_cache=False).logits[0]
        n = doc.shape[1]
        # fp32, same ops on the same values: only summation order may differ.
        torch.testing.assert_close(packed[pos:pos + n], alone, atol=1e-5, rtol=1e-5)
        loss_alone += float(torch.nn.functional.cross_entropy(alone[:-1], doc[0, 1:], reduction="sum"))
        pos += n
    labels = batch["labels"][0]
    loss_packed = float(torch.nn.functional.cross_entropy(packed[:-1], labels[1:], ignore_index=IGNORE,
                                                          reduction="sum"))
    assert loss_packed == pytest.approx(loss_alone, rel=1e-5)
    # Without the reset, later documents would see the earlier ones: the check can fail.
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert not torch.allclose(leaky[pos - n:pos], alone, atol=1e-3)


def test_packed_gradients_equal_sum_over_documents(tokenizer):
    """The backward inside document_starts gives the gradient of the documents run one by one."""
    config = {"model_type": "mamba", "vocab_size": len(tokenizer), "hidden_size": 16, "state_size": 4,
              "num_hidden_layers": 2, "expand": 2, "conv_kernel": 4}
    model = load_model(config, need_tokenizer=False, seed=1).model
    texts = ["Q: abc A: cba\n", "Q: hello A: h\nQ: xy A: y\n"]
    out = tokenize([{"text": t} for t in texts], "text", tokenizer, packing=True, max_length=64)
    batch = data_lib.collate(out.dataset[:], tokenizer.pad_token_id)
    with document_starts(model, batch["document_starts"]):
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        torch.nn.functional.cross_entropy(logits[:-1], batch["labels"][0, 1:], ignore_index=IGNORE,
                                          reduction="sum").backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for text in texts:
        doc = torch.tensor([ids(tokenizer, text) + [tokenizer.eos_token_id]])
        logits = model(input_ids=doc, use_cache=False).logits[0]
        torch.nn.functional.cross_entropy(logits[:-1], doc[0, 1:], reduction="sum").backward()
    for name, param in model.named_parameters():
        # fp32; the chunked scan's backward sums in another order: 1e-5 relative.
        torch.testing.assert_close(packed[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_collate_pads_right_and_masks(tokenizer):
    batch = data_lib.collate({"input_ids": [[5, 6, 7], [8]], "labels": [[5, 6, 7], [IGNORE]]}, pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["labels"].tolist() == [[5, 6, 7], [IGNORE] * 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert data_lib.count_targets(batch) == 2


def test_pack_fills_rows_greedily_in_order():
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]],
                                     "labels": [[1, 2, 3], [IGNORE, 5], [6, 7, 8, 9], [10]]})
    packed = data_lib.pack(ds, max_length=5)
    assert packed["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert packed["document_starts"] == [[1, 0, 0, 1, 0], [1, 0, 0, 0, 1]]
    assert packed["labels"] == [[IGNORE, 2, 3, IGNORE, 5], [IGNORE, 7, 8, 9, IGNORE]]


def test_null_field_names_file_row_and_field(tokenizer, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "Q: ab A:", "completion": " ba"}) + "\n"
                    + json.dumps({"prompt": None, "completion": " cb"}) + "\n")
    d = DataSection(format="completion", train=DataSource(path=str(path)))
    with pytest.raises(UserError) as info:
        data_lib.tokenize_rows(data_lib.load_rows(d.train, "train"), d, tokenizer, "train")
    message = str(info.value)
    assert str(path) in message and "row 2" in message and "'prompt' is null" in message


def test_malformed_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n')
    with pytest.raises(UserError) as info:
        data_lib.load_rows(DataSource(path=str(path)), "train")
    assert str(path) in str(info.value) and "line 3" in str(info.value)
