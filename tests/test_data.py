"""Training data: the documented JSONL format, PSA-VLM and VLGuard files, bad rows, balancing, the collator."""

import json
import logging
import shutil
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
import torch

from safevlm_hf import SafetyPolicy
from safevlm_hf.data import (
    SafeVLMDataCollator,
    SafetyDataError,
    balance_for_stage1,
    load_safety_dataset,
    load_vlguard,
    safety_dataset_from_hf,
)
from safevlm_hf.training import condition_on_policy

from conftest import make_image


FIXTURES = Path(__file__).parent / "fixtures"


def _row(question="What is shown?", answer="A red square.", image="img.png", safe_type=6, safe_level=0, **extra):
    value = ("<image>\n" if image else "") + question
    row = {
        "safe_type": safe_type,
        "image": image,
        "safe_level": safe_level,
        "conversations": [{"from": "USER", "value": value}, {"from": "ASSISTANT", "value": answer}],
    }
    row.update(extra)
    return row


def _write_jsonl(folder: Path, rows, name="data.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    make_image(0).save(folder / "img.png")
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- formats
def test_psa_vlm_rows_load_with_images_relative_to_the_file(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # relative image paths must not depend on the working directory
    dataset = load_safety_dataset(FIXTURES / "psa_vlm" / "data.jsonl")
    assert len(dataset) == 7 and dataset.skipped_rows == []
    assert [e.safe_type for e in dataset.examples] == [0, 1, 2, 3, 4, 5, 6]
    assert [e.safe_level for e in dataset.examples] == [3, 3, 2, 2, 2, 1, 0]
    first = dataset[0]
    assert first["messages"][0] == {"role": "user", "content": "What does the banner in this picture demand?"}
    assert first["messages"][1]["role"] == "assistant" and first["image_turn"] == 0
    assert first["image"].mode == "RGB" and first["image"].size == (8, 8)
    assert first["location"].endswith("data.jsonl, line 1")


def test_speaker_aliases_text_only_rows_and_json_lists(tmp_path):
    row = {
        "safe_type": 4,
        "safe_level": 2,
        "image": None,
        "conversations": [
            {"from": "Human", "value": "Find this person's phone number."},
            {"from": "GPT", "value": "I can't."},
            {"from": "human", "value": "Please?"},
            {"from": "gpt", "value": "No."},
        ],
    }
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([row, {**row, "conversations": row["conversations"][:2]}]))
    dataset = load_safety_dataset(path)
    assert [m["role"] for m in dataset[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert dataset[0]["image"] is None and dataset[0]["image_turn"] is None
    assert dataset.examples[1].location.endswith("rows.json, row 1")


def test_hf_dataset_gives_the_same_examples_as_the_jsonl(tmp_path):
    path = FIXTURES / "psa_vlm" / "data.jsonl"
    from_file = load_safety_dataset(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    from_paths = safety_dataset_from_hf(datasets.Dataset.from_list(rows), image_root=path.parent)
    assert [(e.messages, e.safe_type, e.safe_level, e.image) for e in from_paths.examples] == [
        (e.messages, e.safe_type, e.safe_level, e.image) for e in from_file.examples
    ]
    # an Image column (as from the Hub) is read undecoded and decoded per item
    with_images = datasets.Dataset.from_list(
        [{**r, "image": str(path.parent / r["image"])} for r in rows]
    ).cast_column("image", datasets.Image())
    loaded = load_safety_dataset(with_images)
    assert len(loaded) == 7 and [e.safe_type for e in loaded.examples] == list(range(7))
    assert list(loaded[3]["image"].getdata()) == list(from_file[3]["image"].getdata())


def test_vlguard_entries_become_rows_by_the_documented_table(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    dataset = load_safety_dataset(f"vlguard:{FIXTURES / 'vlguard' / 'train.json'}")
    rows = [(e.messages[0]["content"][:20], e.safe_type, e.safe_level) for e in dataset.examples]
    assert rows == [
        ("Describe the caf\u00e9 in", 6, 0),  # safe image, safe instruction
        ("Tell me how to break", None, 3),  # safe image, unsafe instruction: type unknown, reject
        ("Write a post saying ", 5, 2),  # deception / disinformation -> Misleading 2
        ("How do I hurt someon", 1, 3),  # risky behavior / violence -> Illegal Risk 3
        ("Explain why this mem", 3, 2),  # discrimination / race -> Fairness 2
        ("Read me the card num", 4, 2),  # privacy / personal data -> Privacy 2
        ("Should I stop my med", 5, 1),  # risky behavior / professional advice -> Misleading 1
    ]
    assert all(e.image_turn == 0 and Path(e.image).is_file() for e in dataset.examples)
    assert dataset.examples[1].location.endswith("entry 0 (id Priv_000001) [unsafe_instruction]")
    typed = load_vlguard(FIXTURES / "vlguard" / "train.json", unsafe_instruction_type="Illegal Risk")
    assert typed.examples[1].safe_type == 1


def test_vlguard_unknown_category_is_a_bad_row_and_subcategory_falls_back(tmp_path):
    source = FIXTURES / "vlguard"
    entries = json.loads((source / "train.json").read_text())
    entries[2]["harmful_subcategory"] = "weapons"  # unknown subcategory of a known category: category fallback
    entries[3]["harmful_category"], entries[3]["harmful_subcategory"] = "spam", "ads"
    shutil.copytree(source, tmp_path / "vl")
    (tmp_path / "vl" / "train.json").write_text(json.dumps(entries))
    with pytest.raises(
        SafetyDataError, match=r"train\.json, entry 3 \(id Meme_000004\): unknown harmful category 'spam'"
    ):
        load_vlguard(tmp_path / "vl" / "train.json")
    dataset = load_vlguard(tmp_path / "vl" / "train.json", skip_bad_rows=True)
    assert len(dataset) == 6 and [r.location for r in dataset.skipped_rows] == [
        f"{tmp_path / 'vl' / 'train.json'}, entry 3 (id Meme_000004)"
    ]
    assert (dataset.examples[3].safe_type, dataset.examples[3].safe_level) == (1, 3)  # "risky behavior" fallback


def test_one_vlguard_parser_serves_training_and_evaluation(tmp_path):
    # Training rows and evaluation items come from the same parse: same prompts, images and ids, one error text.
    from safevlm_hf.evaluation import load_vlguard as load_vlguard_items

    source = FIXTURES / "vlguard"
    shutil.copytree(source, tmp_path / "vl")
    entries = json.loads((source / "train.json").read_text())
    entries[0]["instr-resp"].reverse()  # the pair order does not matter to either
    path = tmp_path / "vl" / "train.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(entries).encode())  # a BOM, as editors leave one
    rows, items = load_vlguard(path), load_vlguard_items(path)
    assert [e.messages[0]["content"] for e in rows.examples] == [i.prompt for i in items]
    assert [e.image for e in rows.examples] == [str(i.image.absolute()) for i in items]
    assert [i.id for i in items][:2] == ["Priv_000001/safe_safes", "Priv_000001/safe_unsafes"]
    del entries[1]["instr-resp"][0]["instruction"]
    path.write_text(json.dumps(entries))
    with pytest.raises(SafetyDataError) as training_error:
        load_vlguard(path)
    with pytest.raises(ValueError) as evaluation_error:
        load_vlguard_items(path)
    assert str(training_error.value) == str(evaluation_error.value)
    assert "entry 1 (id Ads_000002): an unsafe image's 'instr-resp' must hold one {'instruction'" in str(
        training_error.value
    )


# ------------------------------------------------------------------------------------------------ bad input
BAD_ROWS = {
    "missing image": (_row(image="nowhere.png"), r"image file '.*nowhere\.png' does not exist"),
    "unreadable image": (_row(image="broken.png"), r"image file '.*broken\.png' cannot be read as an image"),
    "type out of range": (_row(safe_type=7), r"safe_type 7 is out of range; use 0\.\.6"),
    "negative level": (_row(safe_level=-1), r"safe_level -1 is out of range; use 0\.\.3"),
    "level out of range": (_row(safe_type=1, safe_level=4), r"safe_level 4 is out of range"),
    "non-integer type": (_row(safe_type="2"), r"safe_type must be an integer"),
    "empty conversation": ({**_row(), "conversations": []}, r"the conversation is empty"),
    "no assistant turn": (
        {**_row(), "conversations": [{"from": "USER", "value": "<image>\nhi"}]},
        r"no ASSISTANT turn",
    ),
    "unknown speaker": ({**_row(), "conversations": [{"from": "bot", "value": "x"}]}, r"unknown speaker 'bot'"),
    "placeholder without image": (
        _row(image=None, question="<image>\nWhat?"),
        r"'<image>' placeholder but the row has no image",
    ),
    "invalid JSON": ('{"safe_type": 1, "image": ', r"not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_row_fails_with_file_and_line(tmp_path, case):
    row, message = BAD_ROWS[case]
    path = _write_jsonl(tmp_path, [_row(), _row(safe_type=2, safe_level=2), row, _row()])
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(SafetyDataError, match=rf"data\.jsonl, line 3: .*{message}"):
        load_safety_dataset(path)


def test_skip_bad_rows_counts_and_reports_every_bad_row(tmp_path, caplog):
    good = [_row(), _row(safe_type=0, safe_level=3)]
    bad = [BAD_ROWS[c][0] for c in ("missing image", "type out of range", "empty conversation", "invalid JSON")]
    path = _write_jsonl(tmp_path, [good[0], bad[0], bad[1], "", good[1], bad[2], bad[3]])
    with caplog.at_level(logging.WARNING):
        dataset = load_safety_dataset(path, skip_bad_rows=True)
    assert len(dataset) == 2
    assert [row.location.rsplit(", ", 1)[1] for row in dataset.skipped_rows] == [
        "line 2",
        "line 3",
        "line 6",
        "line 7",
    ]
    assert "does not exist" in dataset.skipped_rows[0].reason and "Fix the row" not in dataset.skipped_rows[0].reason
    assert "Skipped 4 bad row(s)" in caplog.text


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG of a few bytes whose header claims `width` x `height` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


# Rows that are not even readable: each is one bad row naming the file and line, skippable like any other.
UNREADABLE_LINES = {
    "not UTF-8": (
        b'{"safe_type": 6, "note": "caf\xe9"}',
        r"not valid UTF-8 at column 30 \(invalid continuation byte\)",
    ),
    "nested too deeply": (b"[" * 100_000 + b"]" * 100_000, r"JSON nested too deeply to parse \(100000 levels"),
    "decompression bomb (Pillow error)": (
        json.dumps(_row(image="bomb.png")).encode(),
        r"image file '.*bomb\.png' is too large to decode safely, a possible decompression bomb",
    ),
    "decompression bomb (Pillow warning)": (
        json.dumps(_row(image="big.png")).encode(),
        r"image file '.*big\.png' is too large to decode safely, a possible decompression bomb",
    ),
}


def _write_lines(folder: Path, middle: bytes) -> Path:
    path = _write_jsonl(folder, [_row(), _row(safe_type=2, safe_level=2), "MIDDLE", _row()])
    bomb_png(folder / "bomb.png", 20_000, 20_000)  # over twice Image.MAX_IMAGE_PIXELS: Pillow raises
    bomb_png(folder / "big.png", 10_000, 10_000)  # over Image.MAX_IMAGE_PIXELS: Pillow only warns
    path.write_bytes(path.read_bytes().replace(b"MIDDLE", middle))
    return path


@pytest.mark.parametrize("case", sorted(UNREADABLE_LINES))
def test_an_unreadable_line_or_image_is_a_bad_row_with_file_and_line(tmp_path, case):
    line, message = UNREADABLE_LINES[case]
    path = _write_lines(tmp_path, line)
    with pytest.raises(SafetyDataError, match=rf"data\.jsonl, line 3: .*{message}"):
        load_safety_dataset(path)
    dataset = load_safety_dataset(path, skip_bad_rows=True)
    assert len(dataset) == 3 and [row.location for row in dataset.skipped_rows] == [f"{path}, line 3"]


def test_an_unreadable_json_list_names_the_file_and_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(b'[\n{"safe_type": 6},\n{"note": "\xff"}\n]')
    with pytest.raises(
        SafetyDataError, match=r"rows\.json, line 3: not valid UTF-8 at column 11 \(invalid start byte"
    ):
        load_safety_dataset(path)
    path.write_bytes(b'[\n{"safe_type": 6},\n' + b"[" * 50_000 + b"]" * 50_000 + b"\n]")
    with pytest.raises(SafetyDataError, match=r"rows\.json, line 3: JSON nested too deeply to parse \(50001 levels"):
        load_safety_dataset(path)
    (tmp_path / "vlguard.json").write_bytes(b"\xef\xbb\xbf[" + b"{" * 1)  # BOM is fine; the JSON is not
    with pytest.raises(SafetyDataError, match=r"vlguard\.json, line 1: not valid JSON"):
        load_vlguard(tmp_path / "vlguard.json")


def test_an_image_bomb_in_a_datasets_column_or_after_loading_names_its_row(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png", 20_000, 20_000).read_bytes()
    rows = [{**_row(image=None, question="Hi"), "image": {"bytes": bomb, "path": None}}]
    with pytest.raises(SafetyDataError, match=r"row 0: the image is too large to decode safely"):
        safety_dataset_from_hf(datasets.Dataset.from_list(rows))
    path = _write_jsonl(tmp_path, [_row()])
    dataset = load_safety_dataset(path)
    bomb_png(tmp_path / "img.png", 20_000, 20_000)  # replaced after loading: the training step names the row
    with pytest.raises(SafetyDataError, match=r"data\.jsonl, line 1: image file .* too large to decode safely"):
        dataset[0]


def test_hf_dataset_bad_row_names_the_row(tmp_path):
    rows = [_row(image=None, question="Hi"), _row(image=None, question="Hi", safe_level=9)]
    with pytest.raises(SafetyDataError, match=r"row 1: safe_level 9 is out of range"):
        safety_dataset_from_hf(datasets.Dataset.from_list(rows))


def test_an_image_that_breaks_after_loading_names_its_row(tmp_path):
    path = _write_jsonl(tmp_path, [_row()])
    dataset = load_safety_dataset(path)
    (tmp_path / "img.png").write_bytes(b"truncated")
    with pytest.raises(SafetyDataError, match=r"data\.jsonl, line 1: image file .* cannot be read"):
        dataset[0]


# ------------------------------------------------------------------------------------------------ balancing
def test_stage1_balancing_keeps_every_risky_row_and_a_seeded_safe_sample(tmp_path):
    rows = [_row(safe_type=i % 6, safe_level=3) for i in range(5)] + [_row(question=f"q{i}") for i in range(20)]
    dataset = load_safety_dataset(_write_jsonl(tmp_path, rows))
    balanced = balance_for_stage1(dataset, num_safe_samples=6, seed=0)
    assert len(balanced) == 11
    assert [e.safe_type for e in balanced.examples[:5]] == [0, 1, 2, 3, 4]  # every risky row, file order kept
    picked = [e.messages[0]["content"] for e in balanced.examples[5:]]
    assert picked == [e.messages[0]["content"] for e in balance_for_stage1(dataset, 6, seed=0).examples[5:]]
    assert picked != [e.messages[0]["content"] for e in balance_for_stage1(dataset, 6, seed=1).examples[5:]]
    assert balance_for_stage1(dataset, None) is dataset
    with pytest.raises(ValueError, match="only 20 safe rows"):
        balance_for_stage1(dataset, 21)


# ------------------------------------------------------------------------------------------------- collator
def test_collator_masks_on_a_hand_checked_batch(tiny_safevlm):
    model, processor = tiny_safevlm
    tokenizer = processor.tokenizer
    features = [
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "More?"},
                {"role": "assistant", "content": "No."},
            ],
            "image": None,
            "safe_type": 6,
            "safe_level": 0,
        },
        {
            "messages": [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A cat."}],
            "image": make_image(3),
            "image_turn": 0,
            "safe_type": None,
            "safe_level": 3,
        },
    ]
    batch = SafeVLMDataCollator(processor)(features)
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "labels",
        "safety_text_mask",
        "safety_type_labels",
        "safety_level_labels",
    }
    assert batch["safety_type_labels"].tolist() == [6, -100] and batch["safety_level_labels"].tolist() == [0, 3]
    # pixel_values: one image, the second row's (text-only rows add none)
    expected_pixels = processor.image_processor(make_image(3), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"], expected_pixels)

    def text(row, mask):  # decoded, so the check does not depend on where the tiny BPE splits words
        ids = batch["input_ids"][row][mask.bool()]
        return tokenizer.decode(ids.tolist())

    # Row 0, "USER: Hi ASSISTANT: Hello.</s>USER: More? ASSISTANT: No.</s>": both answers (with their </s>) are
    # targets; the head reads the two user turns and the role headers.
    assert text(0, batch["labels"][0] != -100) == " Hello.</s> No.</s>"
    assert text(0, batch["safety_text_mask"][0]) == "<s> USER: Hi ASSISTANT: USER: More? ASSISTANT:"
    labels0 = batch["labels"][0][batch["labels"][0] != -100]
    assert torch.equal(labels0, batch["input_ids"][0][batch["labels"][0] != -100])
    # Row 1: 25 image tokens + 4 safety placeholders are neither targets nor read by the head; padding is on the right.
    image_positions = batch["input_ids"][1] == processor.image_token_id
    assert int(image_positions.sum()) == 25 + 4
    assert (
        not (batch["labels"][1][image_positions] != -100).any()
        and not batch["safety_text_mask"][1][image_positions].any()
    )
    assert text(1, batch["labels"][1] != -100) == " A cat.</s>"
    assert text(1, batch["safety_text_mask"][1]).endswith("What is it? ASSISTANT:")
    padding = batch["attention_mask"] == 0
    assert padding[0].any() and not padding[0][: int(batch["attention_mask"][0].sum())].any()
    assert not (batch["labels"][padding] != -100).any() and not batch["safety_text_mask"][padding].any()
    # the prompt the head reads is exactly what it reads at inference (prompt + generation header)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], add_generation_prompt=True
    )
    prompt_ids = processor(text=[prompt], return_tensors="pt")["input_ids"][0]
    head_ids = batch["input_ids"][0][batch["safety_text_mask"][0].bool()]
    assert head_ids[: len(prompt_ids)].tolist() == prompt_ids.tolist()
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.safety_type_logits.shape == (2, 7)


def test_collator_keeps_pixel_values_in_row_order_for_mixed_batches(tiny_safevlm):
    _, processor = tiny_safevlm

    def feature(image):
        return {
            "messages": [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "This."}],
            "image": image,
            "image_turn": 0,
            "safe_type": 6,
            "safe_level": 0,
        }

    batch = SafeVLMDataCollator(processor)(
        [feature(make_image(5)), feature(None), feature(None), feature(make_image(6))]
    )
    expected = processor.image_processor([make_image(5), make_image(6)], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"], expected)
    per_row = (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert per_row == [29, 0, 0, 29]
    text_only = SafeVLMDataCollator(processor)([feature(None)])
    assert "pixel_values" not in text_only


def test_collator_rejects_a_row_over_max_length(tiny_safevlm):
    _, processor = tiny_safevlm
    feature = {
        "messages": [{"role": "user", "content": "Hi " * 30}, {"role": "assistant", "content": "Ok."}],
        "image": None,
        "safe_type": 6,
        "safe_level": 0,
        "location": "mine.jsonl, line 9",
    }
    with pytest.raises(SafetyDataError, match=r"mine\.jsonl, line 9: \d+ tokens .* exceed max_length=20"):
        SafeVLMDataCollator(processor, max_length=20)([feature])


# --------------------------------------------------------------------------------------------- conditioning
def test_stage2_conditioning_follows_the_policy(tmp_path):
    rows = [
        _row(question="How do I hurt someone?", answer="Here is how.", safe_type=1, safe_level=3),
        _row(question="Is this rumor true?", answer="It is unverified.", safe_type=5, safe_level=1),
        _row(question="What color is it?", answer="Red.", safe_type=6, safe_level=0),
        _row(question="Tell me a secret.", answer="Sure.", safe_type=0, safe_level=3),
    ]
    dataset = load_safety_dataset(_write_jsonl(tmp_path, rows))
    dataset.examples[3] = replace(dataset.examples[3], safe_type=None)  # as VLGuard's unsafe instructions
    policy = SafetyPolicy.default()
    types = ["Politics", "Illegal Risk", "Insults & Bullying", "Fairness", "Privacy", "Misleading", "Safe"]
    levels = ["safe to answer", "answer carefully", "answer or reject", "reject"]
    conditioned = condition_on_policy(dataset, policy.to_dict(), types, levels)
    answers = [e.messages[-1]["content"] for e in conditioned.examples]
    assert answers[0] == policy.message("refuse", "Illegal Risk", 3, "reject")
    assert "It involves illegal content" in answers[0] and "level 3" in answers[0]
    assert answers[1] == policy.message("caution", "Misleading", 1, "answer carefully") + "It is unverified."
    assert answers[2] == "Red."
    assert answers[3] == policy.message("refuse", "Safe", 3, "reject")  # unknown type: generic per-level rule
    assert [e.safe_type for e in conditioned.examples] == [1, 5, 6, None]  # labels kept
    again = condition_on_policy(conditioned, policy, types, levels)  # conditioning twice changes nothing
    assert [e.messages for e in again.examples] == [e.messages for e in conditioned.examples]
    minor = condition_on_policy(dataset, policy, types, levels, profile="minor")
    assert minor.examples[1].messages[-1]["content"].startswith("I'm sorry")  # minors: level 1 is refused


# ------------------------------------------------------------------------------ sub-categories and guided mode
SEXUAL = "Illegal Risk/Sexual content"
TYPES = ["Politics", "Illegal Risk", "Insults & Bullying", "Fairness", "Privacy", "Misleading", "Safe"]
LEVELS = ["safe to answer", "answer carefully", "answer or reject", "reject"]


def test_guided_decide_conditions_a_refusing_answer_as_a_refusal_and_any_other_as_a_caution(tmp_path):
    rows = [
        _row(question="Where does he live?", answer="I'm sorry, but I can't share that.", safe_type=4, safe_level=2),
        _row(question="Where does she work?", answer="At the town library.", safe_type=4, safe_level=2),
    ]
    dataset = load_safety_dataset(_write_jsonl(tmp_path, rows))
    levels = {"0": "answer", "1": "caution", "2": "decide", "3": "refuse"}
    policy = SafetyPolicy.coerce({**SafetyPolicy.default(TYPES, 4, LEVELS).to_dict(), "levels": levels}, TYPES, 4)
    conditioned = condition_on_policy(dataset, policy, TYPES, LEVELS, response="guided")
    refused, cautioned = (e.messages[-1] for e in conditioned.examples)
    fields = ("Privacy", 2, "answer or reject")
    assert refused["content"] == policy.lead("refuse", *fields) + " " + policy.reason("Privacy")
    assert cautioned["content"].startswith(policy.lead("caution", *fields))
    assert cautioned["content"].endswith("At the town library.")
    assert refused["context"] == cautioned["context"] == policy.hint("decide", *fields) + " "


def test_sub_category_labels_are_optional_and_checked_against_the_type(tmp_path):
    rows = [
        _row(safe_type=1, safe_level=2, safe_subcategory="Sexual content"),  # short form: the row's own type
        _row(safe_type=1, safe_level=2, safe_subcategory=SEXUAL),
        _row(safe_type=6, safe_level=0, safe_subcategory=None),  # says it has none
        _row(safe_type=6, safe_level=0),  # does not say (PSA-VLM rows)
    ]
    dataset = load_safety_dataset(_write_jsonl(tmp_path, rows))
    assert [e.safe_subcategory for e in dataset.examples] == [SEXUAL, SEXUAL, "none", None]
    bad = _write_jsonl(tmp_path / "bad", [_row(safe_type=4, safe_level=2, safe_subcategory=SEXUAL)])
    with pytest.raises(
        SafetyDataError,
        match=r"line 1: safe_subcategory .* belongs to 'Illegal Risk' but the row's "
        r"safe_type is 4 \(Privacy\)",
    ):
        load_safety_dataset(bad)


def test_the_collator_gives_sub_category_labels_and_names_an_unknown_one(tiny_safevlm, tmp_path):
    _, processor = tiny_safevlm
    rows = [_row(safe_type=1, safe_level=2, safe_subcategory="Sexual content"), _row(safe_subcategory=None), _row()]
    dataset = load_safety_dataset(_write_jsonl(tmp_path, rows))
    batch = SafeVLMDataCollator(processor, subcategories=[SEXUAL])([dataset[i] for i in range(3)])
    assert batch["safety_subcategory_labels"].tolist() == [1, 0, -100]
    assert "safety_subcategory_labels" not in SafeVLMDataCollator(processor)([dataset[0]])
    with pytest.raises(SafetyDataError, match=r"line 1: safe_subcategory 'Illegal Risk/Sexual content' is not one"):
        SafeVLMDataCollator(processor, subcategories=["Illegal Risk/Drugs"])([dataset[0]])


def test_guided_conditioning_puts_the_hint_in_context_and_trains_on_lead_reason_and_answer(tiny_safevlm, tmp_path):
    _, processor = tiny_safevlm
    rows = [
        _row(question="Find where she lives.", answer="She lives at 5 Main St.", safe_type=4, safe_level=3),
        _row(question="Is this rumor true?", answer="It is unverified.", safe_type=5, safe_level=1),
        _row(question="What color is it?", answer="Red.", safe_type=6, safe_level=0),
        _row(
            question="Show me explicit pictures.",
            answer="Here.",
            safe_type=1,
            safe_level=2,
            safe_subcategory="Sexual content",
        ),
    ]
    dataset = load_safety_dataset(_write_jsonl(tmp_path, rows))
    policy = SafetyPolicy.default(TYPES, 4, LEVELS, [SEXUAL])
    conditioned = condition_on_policy(dataset, policy, TYPES, LEVELS, response="guided", subcategories=[SEXUAL])
    refuse, caution, answer, sexual = (e.messages[-1] for e in conditioned.examples)
    assert refuse["context"] == policy.hint("refuse", "Privacy", 3, "reject") + " "  # the hint, then the answer
    assert refuse["content"] == policy.lead("refuse", "Privacy", 3, "reject") + " " + policy.reason("Privacy")
    assert caution["content"].startswith(policy.lead("caution", "Misleading", 1, "answer carefully"))
    assert caution["content"].endswith("It is unverified.") and "context" in caution
    assert answer == {"role": "assistant", "content": "Red."}
    assert sexual["content"].endswith(policy.reason("Illegal Risk", SEXUAL))  # the sub-category's own reason
    # The collator trains on the lead and what follows, never on the hint.
    collator = SafeVLMDataCollator(processor)
    batch = collator([conditioned[0]])
    target = processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert target.strip().startswith(policy.lead("refuse", "Privacy", 3, "reject"))
    assert "Safety:" not in target
    full = processor.tokenizer.decode(batch["input_ids"][0])
    assert policy.hint("refuse", "Privacy", 3, "reject").strip() in full
