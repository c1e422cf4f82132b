"""The checkpoint's code against the declared transformers range.

* What `modeling/` takes from transformers beyond its top-level exports is listed, with a reason, in
  `TRANSFORMERS_INTERNALS`; a new import from a submodule or a new private attribute fails here until it is listed.
* A checkpoint saved under one end of the range loads by remote code, with the package hidden, under the other end,
  with identical weights, logits, verdicts and gated output. The other end is a second Python environment named by
  `SAFEVLM_FLOOR_PYTHON` (`.ci/run` builds it with the floor release from pyproject.toml).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from safevlm_hf.modeling import modeling_safevlm

from conftest import REMOTE_LOAD_AND_ENCODE, chat_prompt, make_image


ROOT = Path(__file__).resolve().parents[1]
MODELING_DIR = ROOT / "modeling"


def _declared_range() -> tuple[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"transformers>=([0-9.]+),<([0-9.]+)"', text)
    assert match, "pyproject.toml must declare transformers as 'transformers>=FLOOR,<CEILING'"
    return match.group(1), match.group(2)


def _own_names() -> set[str]:
    """Every name our modeling files define (functions, classes, attributes, methods, parameters)."""
    names: set[str] = set()
    for path in MODELING_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return names


def test_every_transformers_internal_the_code_uses_is_listed_with_a_reason():
    listed = modeling_safevlm.TRANSFORMERS_INTERNALS
    assert all(isinstance(reason, str) and reason.strip() for reason in listed.values())
    own = _own_names()
    used: set[str] = set()
    for path in MODELING_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transformers"):
                for alias in node.names:
                    qualified = f"{node.module}.{alias.name}"
                    if node.module == "transformers" and not alias.name[:1].islower():
                        continue  # a top-level export (class or function) is public API
                    if node.module == "transformers" and alias.name in {"AutoConfig", "AutoTokenizer"}:
                        continue
                    used.add(qualified if qualified in listed or node.module == "transformers" else node.module)
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if node.attr not in own:
                    used.add(node.attr)
    for name in sorted(used):
        module_listed = any(key == name or key.startswith(name + ".") for key in listed)
        assert name in listed or module_listed, (
            f"modeling/ uses the transformers internal {name!r}: list it in TRANSFORMERS_INTERNALS with the reason, "
            "or use public API instead"
        )


def test_the_declared_range_matches_what_the_code_was_tested_with():
    floor, ceiling = _declared_range()
    tested_floor, tested_newest = modeling_safevlm.TESTED_TRANSFORMERS
    assert tested_floor.split(".")[:2] == floor.split(".")[:2], "TESTED_TRANSFORMERS[0] must be pyproject's floor"
    installed = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    assert tuple(int(x) for x in floor.split(".")[:2]) <= installed < tuple(int(x) for x in ceiling.split(".")[:2])
    # A release newer than TESTED_TRANSFORMERS[1] is allowed by the range: the modeling code warns its users once at
    # import (CI runs on the newest release pip resolves, so this suite is what tells whether it still works).


# --------------------------------------------------------------------------------------- across the range
PROMPTS = ["What is in this picture?", "Where does the person in this photo live?"]
POLICY = {"levels": {"0": "answer", "1": "refuse", "2": "refuse", "3": "refuse"}}

SAVE_SCRIPT = textwrap.dedent(
    """
    import sys
    from safevlm_hf.tiny import TinyLlavaSpec, build_tiny_safevlm
    model, processor = build_tiny_safevlm(TinyLlavaSpec(seed=3), num_safety_tokens=4)
    model.save_pretrained(sys.argv[1]); processor.save_pretrained(sys.argv[1])
    """
)

RUN_SCRIPT = (
    textwrap.dedent(
        """
    import json, sys
    sys.modules["safevlm_hf"] = None  # only the code inside the checkpoint may run
    import numpy as np, torch, transformers
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor
    path, prompts, policy, out_path = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    """
    )
    + REMOTE_LOAD_AND_ENCODE
    + textwrap.dedent(
        """
    with torch.no_grad():
        out = model(**inputs)
    verdicts = [v.to_dict() for v in model.assess(**inputs, safety_policy=policy)]
    gated = model.generate(**inputs, max_new_tokens=10, do_sample=False, safety_policy=policy)
    weights = load_file(f"{path}/model.safetensors")
    state = model.state_dict()
    torch.save({"version": transformers.__version__, "module": type(model).__module__,
                "same_weights": all(torch.equal(state[k], v) for k, v in weights.items() if k in state),
                "logits": out.logits, "type": out.safety_type_logits, "level": out.safety_level_logits,
                "actions": [v["action"] for v in verdicts], "levels": [v["level"] for v in verdicts],
                "gated": gated}, out_path)
    """
    )
)


def _floor_python() -> str:
    python = os.environ.get("SAFEVLM_FLOOR_PYTHON")
    if not python:
        if os.environ.get("CI"):
            pytest.fail("CI must set SAFEVLM_FLOOR_PYTHON (the floor-release environment built by .ci/run)")
        pytest.skip("SAFEVLM_FLOOR_PYTHON is not set: no second transformers release to test against")
    return python


def _run(python: str, script: str, *args: str, cwd: Path) -> None:
    run = subprocess.run([python, "-c", script, *args], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert run.returncode == 0, run.stderr[-4000:]


def _results(python: str, checkpoint: Path, tmp_path: Path, name: str) -> dict:
    out = tmp_path / f"{name}.pt"
    _run(python, RUN_SCRIPT, str(checkpoint), json.dumps(PROMPTS), json.dumps(POLICY), str(out), cwd=tmp_path)
    return torch.load(out)


@pytest.mark.parametrize("saved_under", ["floor", "newest"])
def test_a_checkpoint_saved_at_one_end_of_the_range_runs_identically_at_the_other(saved_under, tmp_path):
    floor_python = _floor_python()
    python = {"floor": floor_python, "newest": sys.executable}
    checkpoint = tmp_path / f"saved-under-{saved_under}"
    _run(python[saved_under], SAVE_SCRIPT, str(checkpoint), cwd=tmp_path)
    floor = _results(floor_python, checkpoint, tmp_path, "floor")
    newest = _results(sys.executable, checkpoint, tmp_path, "newest")
    assert floor["version"] != newest["version"], "both environments run the same transformers release"
    for results in (floor, newest):
        assert results["module"].startswith("transformers_modules."), results["module"]
        assert results["same_weights"]
    torch.testing.assert_close(floor["logits"], newest["logits"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(floor["type"], newest["type"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(floor["level"], newest["level"], atol=1e-6, rtol=1e-5)
    assert floor["actions"] == newest["actions"] and floor["levels"] == newest["levels"]
    assert torch.equal(floor["gated"], newest["gated"])


def test_the_installed_model_agrees_with_its_own_remote_code(_tiny_safevlm_pair, saved_safevlm, tmp_path):
    # The same comparison within one release: the remote-code copy is the installed code.
    model, processor = _tiny_safevlm_pair
    images = [make_image(0, 40), make_image(1, 40)]
    texts = [chat_prompt(processor, p) for p in PROMPTS]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    remote = _results(sys.executable, saved_safevlm, tmp_path, "remote")
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(remote["logits"], out.logits, atol=1e-5, rtol=1e-4)
    assert remote["actions"] == [v.action for v in model.assess(**inputs, safety_policy=POLICY)]
    gated = model.generate(**inputs, max_new_tokens=10, do_sample=False, safety_policy=POLICY)
    assert torch.equal(remote["gated"], gated)
