"""Pushing a checkpoint: the uploaded file set is complete and exact, loads without the package, and the CLI makes
the right Hub calls (the Hub itself is replaced by recorders: network use is the only part not exercised)."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import CommitInfo, HfApi, RepoUrl
from huggingface_hub.errors import HfHubHTTPError

from safevlm_hf.hub import CheckpointFolderError, build_push_call, check_upload_folder, push_to_hub, remote_code_files
from safevlm_hf.hub.cli import register
from safevlm_hf.hub.model_card import REPO_ID_PLACEHOLDER, model_card_origin

from conftest import make_image
from test_model_card import save_checkpoint_with_card


BASE_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}
JUNK = {
    "optimizer.pt": b"\x80\x04",
    "training_args.bin": b"\x80\x04",
    "notes.txt": b"x",
    "checkpoint-5/model.safetensors": b"",
}


@pytest.fixture(scope="module")
def checkpoint(_tiny_safevlm_pair, tmp_path_factory) -> Path:
    """A saved tiny SafeVLM (model + processor + card). Tests copy it before changing anything."""
    model, processor = _tiny_safevlm_pair
    path = tmp_path_factory.mktemp("hub_ckpt")
    save_checkpoint_with_card(model, processor, path)
    return path


@pytest.fixture
def folder(checkpoint, tmp_path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    return copy


def _expected_files(folder: Path) -> set[str]:
    # The code files are whatever save_pretrained copied (the auto_map targets and their relative imports).
    return BASE_FILES | {p.name for p in folder.glob("*.py")}


# ------------------------------------------------------------------------------------------- the upload set
def test_upload_set_is_exactly_what_a_remote_load_needs(folder, caplog):
    for name, content in JUNK.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(content)
    files = check_upload_folder(folder)
    assert set(files) == _expected_files(folder) and len(files) == len(set(files))
    assert {
        "modeling_safevlm.py",
        "configuration_safevlm.py",
        "processing_safevlm.py",
        "policy_safevlm.py",
        "gating_safevlm.py",
    } <= set(files)
    assert remote_code_files(folder) == files
    assert all(name in caplog.text for name in JUNK)  # what is left out is named


def test_the_uploaded_files_alone_load_without_the_package_and_the_card_quick_start_runs(folder, tmp_path):
    upload = tmp_path / "upload"
    upload.mkdir()
    for name in check_upload_folder(folder):
        shutil.copy(folder / name, upload / name)
    card = (upload / "README.md").read_text(encoding="utf-8")
    quick_start = card.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", quick_start, flags=re.S)
    assert len(blocks) == 2  # Auto classes + pipeline
    code = "\n".join(blocks).replace(REPO_ID_PLACEHOLDER, str(upload))
    make_image(3).save(tmp_path / "image.jpg")
    script = (
        textwrap.dedent(
            """
        import sys
        sys.modules["safevlm_hf"] = None  # a Hub user without our package
        import json
        """
        )
        + code
        + textwrap.dedent(
            """
        from transformers import AutoModel
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        again = AutoModel.from_pretrained(repo_id, trust_remote_code=True, revision=revision)
        assert type(again).__name__ == type(model).__name__ == "SafeVLMForConditionalGeneration"
        print("VERDICT", verdicts[0].action)
        """
        )
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "generated_text" in run.stdout and "VERDICT" in run.stdout
    assert re.search(r"SafetyVerdict\(category=", run.stdout)


def test_sharded_weights_upload_the_index_and_every_shard(_tiny_safevlm_pair, tmp_path):
    model, processor = _tiny_safevlm_pair
    save_checkpoint_with_card(model, processor, tmp_path, max_shard_size="400KB")
    shards = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values()
    files = check_upload_folder(tmp_path)
    assert {"model.safetensors.index.json", *shards} <= set(files) and "model.safetensors" not in files
    missing = sorted(set(shards))[-1]
    (tmp_path / missing).unlink()
    message = f"missing: {missing} (listed in model.safetensors.index.json)"
    with pytest.raises(CheckpointFolderError, match=re.escape(message)):
        check_upload_folder(tmp_path)


def test_each_shard_is_checked_once_however_many_tensors_it_holds(_tiny_safevlm_pair, tmp_path, monkeypatch):
    model, processor = _tiny_safevlm_pair
    save_checkpoint_with_card(model, processor, tmp_path, max_shard_size="400KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    shards = set(weight_map.values())
    assert len(weight_map) > 2 * len(shards)  # several tensors per shard, or the check below proves nothing
    looked_at: list[str] = []
    lstat = os.lstat
    monkeypatch.setattr(os, "lstat", lambda path: looked_at.append(Path(path).name) or lstat(path))
    check_upload_folder(tmp_path)
    assert {name: looked_at.count(name) for name in shards} == dict.fromkeys(shards, 1)


@pytest.mark.parametrize(
    "remove, add, message",
    [
        ("tokenizer.json", None, "the tokenizer vocabulary"),
        ("policy_safevlm.py", None, "missing: policy_safevlm.py (imported by the code files)"),
        ("processor_config.json", None, "missing: processor_config.json (processor config"),
        ("README.md", None, "missing: README.md (the model card"),
        ("generation_config.json", None, "missing: generation_config.json"),
        ("chat_template.jinja", None, "missing: chat_template.jinja (the chat template"),
        ("model.safetensors", "pytorch_model.bin", "pickled files ['pytorch_model.bin']: they are never uploaded"),
        (None, "model.safetensors.index.json", "both model.safetensors and model.safetensors.index.json"),
    ],
)
def test_an_incomplete_folder_names_what_is_missing(folder, remove, add, message):
    if remove:
        (folder / remove).unlink()
    if add:
        (folder / add).write_text('{"weight_map": {"x": "model.safetensors"}}')
    with pytest.raises(CheckpointFolderError, match=re.escape(message)) as err:
        check_upload_folder(folder)
    assert str(folder) in str(err.value)


def test_a_config_without_auto_map_or_with_foreign_code_is_refused(folder):
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModel"] = "someone/else--modeling_x.Model"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFolderError, match="loads code from another repository"):
        check_upload_folder(folder)
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFolderError, match="config.json has no auto_map"):
        check_upload_folder(folder)


# ------------------------------------------------------------------------ nothing from outside the folder
def _outside_file(tmp_path: Path, name: str) -> Path:
    secret = tmp_path / "outside" / name
    secret.parent.mkdir(exist_ok=True)
    secret.write_text("SECRET: must never be uploaded")
    return secret


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("shard", ["ABSOLUTE", "../outside/shard.safetensors", "sub/../../outside/shard.safetensors"])
def test_a_weight_map_entry_outside_the_folder_is_refused(_tiny_safevlm_pair, tmp_path, monkeypatch, shard):
    model, processor = _tiny_safevlm_pair
    folder = tmp_path / "ckpt"
    save_checkpoint_with_card(model, processor, folder, max_shard_size="400KB")
    secret = _outside_file(tmp_path, "shard.safetensors")
    shard = str(secret) if shard == "ABSOLUTE" else shard
    index = folder / "model.safetensors.index.json"
    tensor = sorted(json.loads(index.read_text())["weight_map"])[0]
    _edit_json(index, lambda data: data["weight_map"].__setitem__(tensor, shard))
    hub = HubRecorder(monkeypatch)
    with pytest.raises(CheckpointFolderError) as err:
        push_to_hub(folder, "acme/x")
    assert f"model.safetensors.index.json: weight_map[{tensor!r}]: {shard!r} is not a path inside the folder" in str(
        err.value
    )
    assert hub.calls == [] and hub.uploaded == {}


def test_an_auto_map_module_outside_the_folder_is_refused(folder, tmp_path):
    secret = _outside_file(tmp_path, "evil.py")
    for reference in (f"{secret.with_suffix('')}.Evil", "../outside/evil.Evil"):
        _edit_json(folder / "config.json", lambda data: data["auto_map"].__setitem__("AutoConfig", reference))
        with pytest.raises(CheckpointFolderError) as err:
            check_upload_folder(folder)
        assert f"config.json: auto_map['AutoConfig'] = {reference!r} does not name a code file inside the folder" in (
            str(err.value)
        )


@pytest.mark.parametrize("name", ["tokenizer.json", "policy_safevlm.py", "config.json", "README.md"])
def test_a_symlinked_file_is_refused_not_followed(folder, tmp_path, monkeypatch, capsys, name):
    secret = _outside_file(tmp_path, name)
    (folder / name).unlink()
    (folder / name).symlink_to(secret)
    hub = HubRecorder(monkeypatch)
    args = _parse(["push", "--model", str(folder), "--repo-id", "acme/x"])
    assert args.func(args) == 2
    assert f"{name}: {name!r} is reached through a symbolic link to {str(secret)!r}" in capsys.readouterr().err
    assert hub.calls == []


def test_a_symlinked_folder_and_special_files_are_refused(folder, tmp_path):
    templates = tmp_path / "outside" / "templates"
    templates.mkdir(parents=True)
    (templates / "default.jinja").write_text("{{ secret }}")
    (folder / "additional_chat_templates").symlink_to(templates)
    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")  # a reader of this would block forever
    with pytest.raises(CheckpointFolderError) as err:
        check_upload_folder(folder)
    message = str(err.value)
    assert "additional_chat_templates/: 'additional_chat_templates/' is reached through a symbolic link" in message
    assert "tokenizer.json: 'tokenizer.json' is not a regular file (a FIFO)" in message


def test_cli_push_lists_every_file_before_uploading(folder, monkeypatch, capsys):
    hub = HubRecorder(monkeypatch)
    args = _parse(["push", "--model", str(folder), "--repo-id", "acme/x"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    listed = out.split("to acme/x:\n", 1)[1].split("Committed", 1)[0].split()
    assert sorted(listed) == sorted(hub.uploaded) == sorted(_expected_files(folder))


# ----------------------------------------------------------------------------------------- the Hub calls
class HubRecorder:
    """Replaces the HfApi methods a push uses; each call is checked against the real method's signature."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        for name in ("__init__", "create_repo", "create_branch", "create_commit"):
            monkeypatch.setattr(HfApi, name, self._recorder(name, getattr(HfApi, name)))
        for name in ("upload_folder", "upload_file", "delete_file", "delete_files", "delete_folder"):
            monkeypatch.setattr(HfApi, name, self._forbidden(name))

    def _recorder(self, name, original):
        signature = inspect.signature(original)
        recorder = self

        def record(api, *args, **kwargs):
            bound = signature.bind(api, *args, **kwargs)  # a wrong argument name fails here, as on the Hub
            arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
            recorder.calls.append((name, arguments))
            if name == "__init__":
                api.token = arguments.get("token")
                return None
            if name == "create_repo":
                repo_id = arguments["repo_id"] if "/" in arguments["repo_id"] else f"me/{arguments['repo_id']}"
                return RepoUrl(f"https://huggingface.co/{repo_id}")
            if name == "create_commit":
                for op in arguments["operations"]:
                    with op.as_file() as handle:
                        recorder.uploaded[op.path_in_repo] = handle.read()
                oid = "c0ffee" * 6 + "abcd"
                return CommitInfo(
                    commit_url=f"https://huggingface.co/{arguments['repo_id']}/commit/{oid}",
                    commit_message=arguments["commit_message"],
                    commit_description="",
                    oid=oid,
                )
            return None

        return record

    @staticmethod
    def _forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"push must not call HfApi.{name}")

        return fail

    def named(self, name: str) -> list[dict]:
        return [arguments for call, arguments in self.calls if call == name]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="safevlm")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_push_makes_one_commit_with_the_checked_files(folder, monkeypatch, capsys):
    hub = HubRecorder(monkeypatch)
    monkeypatch.setenv("MY_HF_TOKEN", "hf_secret")
    card_on_disk = (folder / "README.md").read_bytes()
    args = _parse(
        [
            "push",
            "--model",
            str(folder),
            "--repo-id",
            "acme/safevlm-tiny",
            "--private",
            "--revision",
            "dev",
            "--token-env",
            "MY_HF_TOKEN",
            "--commit-message",
            "SafeVLM v1",
        ]
    )
    call = build_push_call(args)  # everything is decided before the network
    assert (call.repo_id, call.private, call.revision, call.token, call.commit_message) == (
        "acme/safevlm-tiny",
        True,
        "dev",
        "hf_secret",
        "SafeVLM v1",
    )
    assert set(call.files) == _expected_files(folder) and "hf_secret" not in repr(call)
    assert hub.calls == []

    assert args.func(args) == 0
    assert [name for name, _ in hub.calls] == ["__init__", "create_repo", "create_branch", "create_commit"]
    assert hub.named("__init__")[0]["token"] == "hf_secret"
    assert hub.named("create_repo") == [
        {"repo_id": "acme/safevlm-tiny", "private": True, "exist_ok": True, "repo_type": "model"}
    ]
    assert hub.named("create_branch") == [
        {"repo_id": "acme/safevlm-tiny", "branch": "dev", "exist_ok": True, "repo_type": "model"}
    ]
    (commit,) = hub.named("create_commit")
    assert commit["repo_id"] == "acme/safevlm-tiny" and commit["revision"] == "dev"
    assert commit["commit_message"] == "SafeVLM v1"
    assert set(hub.uploaded) == _expected_files(folder)
    for name, content in hub.uploaded.items():
        if name != "README.md":
            assert content == (folder / name).read_bytes(), name
    # the uploaded card names the repo in its quick-start; the user's folder is left as it was
    card = hub.uploaded["README.md"].decode("utf-8")
    assert 'repo_id = "acme/safevlm-tiny"' in card and model_card_origin(card) == "generated"
    assert (folder / "README.md").read_bytes() == card_on_disk
    out = capsys.readouterr().out
    assert 'revision="c0ffeec0ffee' in out and "acme/safevlm-tiny" in out


def test_cli_push_defaults_keep_visibility_and_commit_to_main(folder, monkeypatch, capsys):
    hub = HubRecorder(monkeypatch)
    args = _parse(["push", "--model", str(folder), "--repo-id", "safevlm-tiny"])
    assert args.func(args) == 0
    assert hub.named("__init__")[0].get("token") is None  # huggingface_hub's own login lookup
    assert hub.named("create_repo")[0]["private"] is None and hub.named("create_branch") == []
    (commit,) = hub.named("create_commit")
    assert commit["repo_id"] == "me/safevlm-tiny" and commit.get("revision") is None
    assert 'from_pretrained("me/safevlm-tiny", trust_remote_code=True' in capsys.readouterr().out


def test_cli_push_plans_the_folder_once(folder, monkeypatch, capsys):
    from safevlm_hf.hub import push

    hub = HubRecorder(monkeypatch)
    plans = []
    plan = push._plan_upload
    monkeypatch.setattr(push, "_plan_upload", lambda model_dir: plans.append(model_dir) or plan(model_dir))
    args = _parse(["push", "--model", str(folder), "--repo-id", "acme/x"])
    assert args.func(args) == 0
    assert len(plans) == 1 and set(hub.uploaded) == _expected_files(folder)


def test_push_with_a_file_list_still_refuses_what_is_not_a_regular_file_inside(folder, tmp_path, monkeypatch):
    hub = HubRecorder(monkeypatch)
    files = check_upload_folder(folder)
    secret = _outside_file(tmp_path, "tokenizer.json")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(secret)  # replaced after the check
    with pytest.raises(CheckpointFolderError, match=re.escape("'tokenizer.json' is reached through a symbolic link")):
        push_to_hub(folder, "acme/x", files=files)
    with pytest.raises(CheckpointFolderError, match=re.escape("'../outside/tokenizer.json' is not a path inside")):
        push_to_hub(folder, "acme/x", files=["config.json", "../outside/tokenizer.json"])
    assert hub.calls == []


def test_a_user_card_is_uploaded_unchanged(folder, monkeypatch):
    hub = HubRecorder(monkeypatch)
    (folder / "README.md").write_text(f"# Ours\n\nrepo: {REPO_ID_PLACEHOLDER}\n")
    push_to_hub(folder, "acme/safevlm-tiny")
    assert hub.uploaded["README.md"] == (folder / "README.md").read_bytes()


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--repo-id", "acme/x"], {}, "missing: README.md"),
        (["--repo-id", "acme/x/y"], {}, "--repo-id must look like 'owner/name'"),
        (["--repo-id", "acme/x", "--token-env", "NOT_SET_ANYWHERE"], {}, "NOT_SET_ANYWHERE"),
    ],
)
def test_cli_push_refuses_bad_input_before_any_network(folder, monkeypatch, capsys, argv, env, message):
    hub = HubRecorder(monkeypatch)
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    if "missing: README.md" in message:
        (folder / "README.md").unlink()
    args = _parse(["push", "--model", str(folder), *argv])
    assert args.func(args) == 2
    assert message in capsys.readouterr().err
    assert hub.calls == []


def test_cli_push_reports_a_hub_error(folder, monkeypatch, capsys):
    HubRecorder(monkeypatch)

    def refuse(self, *args, **kwargs):
        raise HfHubHTTPError("403 Forbidden: no write access", response=SimpleNamespace(headers={}, request=None))

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    args = _parse(["push", "--model", str(folder), "--repo-id", "acme/x"])
    assert args.func(args) == 1
    assert "acme/x" in capsys.readouterr().err
