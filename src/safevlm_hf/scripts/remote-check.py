"""Gated generation from a SafeVLM checkpoint in a process that cannot import safevlm_hf.

A script shipped as package data, not a module (the hyphen in its name keeps it unimportable). The demo runs it in an
isolated interpreter (`python -I`: no PYTHONPATH, no user site, not this folder on `sys.path`)::

    python -I path/to/safevlm_hf/scripts/remote-check.py CHECKPOINT DATA.jsonl --levels 0 3 [--max-new-tokens 40]

It blocks `import safevlm_hf`, loads the checkpoint with `AutoModelForImageTextToText` / `AutoProcessor` and
`trust_remote_code=True` (so only the code inside the checkpoint runs, exactly as for a user who never installed the
package), generates for the rows of a JSONL file in the documented training format whose `safe_level` is listed, and
prints one JSON object: the class that was loaded and, per row, the verdict and the answer.
"""

import sys

if __name__ == "__main__":
    sys.modules["safevlm_hf"] = None  # any import of the package from here on fails

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402
from transformers.utils import logging  # noqa: E402


def _rows(path: Path, levels: set[int]) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if row["safe_level"] in levels:
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("data")
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--response", choices=["template", "guided"], default=None)
    args = parser.parse_args(argv)

    logging.set_verbosity_error()
    model = AutoModelForImageTextToText.from_pretrained(args.checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.checkpoint, trust_remote_code=True)
    data = Path(args.data)
    rows = _rows(data, set(args.levels))
    records = []
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start : start + args.batch_size]
        users, texts, images = [], [], []
        for row in batch:
            user = next(t["value"] for t in row["conversations"] if t["from"].upper() == "USER")
            users.append(user.replace("<image>", "").strip())
            content = [{"type": "image"}, {"type": "text", "text": users[-1]}]
            texts.append(
                processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            )
            images.append(Image.open(data.parent / row["image"]).convert("RGB"))
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                return_dict_in_generate=True,
                safety_response=args.response,
            )
        answers = processor.batch_decode(output.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for row, user, verdict, answer in zip(batch, users, output.safety_verdicts, answers):
            records.append(
                {
                    "prompt": user,
                    "label": {
                        "safe_type": row["safe_type"],
                        "safe_level": row["safe_level"],
                        "safe_subcategory": row.get("safe_subcategory"),
                    },
                    "verdict": {
                        "category": verdict.category,
                        "subcategory": verdict.subcategory,
                        "level": verdict.level,
                        "action": verdict.action,
                        "message": verdict.message,
                        "response": verdict.response,
                    },
                    "answer": answer.strip(),
                }
            )
    print(json.dumps({"class": f"{type(model).__module__}.{type(model).__name__}", "records": records}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
