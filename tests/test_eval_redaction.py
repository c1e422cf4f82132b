"""Judge credentials (issue 12, item 7): never written to reports, caches or errors; a key pasted where an
environment-variable name belongs is refused; requests never go out unauthenticated by accident; an unparseable reply
is never cached."""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import pytest
from test_eval_judges import ITEMS, chat_server  # noqa: F401  (the loopback OpenAI-compatible server fixture)

from safevlm_hf.evaluation.cli import register, run
from safevlm_hf.evaluation.judges import JudgeEndpointError, JudgeError, OpenAIChatJudge
from safevlm_hf.evaluation.redaction import check_env_var_name, redact, redact_text, redact_url


SECRET = "s3cr3t-Pa55"
KEY = "sk-proj-AbCdEf0123456789ghIJklMNop"
XSTEST = Path(__file__).parent / "fixtures" / "benchmarks" / "xstest" / "xstest_v2_prompts.csv"


def test_redact_url_text_and_nested_values():
    url = f"https://alice:{SECRET}@judge.example.com:8443/v1?api-key={KEY}&api-version=2024-06-01"
    redacted = redact_url(url)
    assert SECRET not in redacted and KEY not in redacted and "alice" not in redacted
    assert redacted.startswith("https://REDACTED@judge.example.com:8443/v1?") and "api-version=2024-06-01" in redacted
    assert redact_url("http://localhost:8000/v1") == "http://localhost:8000/v1"
    text = f"Authorization: Bearer {KEY} for {url} and hf_{'a1B2' * 6}"
    assert KEY not in redact_text(text) and SECRET not in redact_text(text) and "hf_a1B2" not in redact_text(text)
    nested = redact({"command": ["--judge-base-url", url], "judge": {"endpoint": url, "n": 3}})
    assert SECRET not in json.dumps(nested) and nested["judge"]["n"] == 3


@pytest.mark.parametrize("value", [KEY, "sk_live_0123456789abcdefABCD", f"Bearer {KEY}", "AbCdEfGh1234567890XyZw99"])
def test_key_shaped_values_are_not_environment_variable_names(value):
    with pytest.raises(ValueError, match="looks like a key itself") as err:
        check_env_var_name(value, "--judge-api-key-env")
    assert value not in str(err.value)  # the error never echoes the key
    assert check_env_var_name("OPENAI_API_KEY") == "OPENAI_API_KEY"
    with pytest.raises(ValueError, match="name of an environment variable"):
        check_env_var_name("MY-KEY")


def test_basic_auth_and_query_credentials_reach_the_server_only(chat_server, tmp_path):  # noqa: F811
    host_port = chat_server.base_url.split("//", 1)[1].split("/", 1)[0]
    url = f"http://alice:{SECRET}@{host_port}/v1?api-key={KEY}"
    judge = OpenAIChatJudge("judge-model", base_url=url, cache_dir=tmp_path / "cache", api_key_env="UNSET_VARIABLE_X")
    judge.judge(ITEMS[:1])
    request = chat_server.requests[0]
    assert request["auth"] == "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()
    assert request["path"] == f"/v1/chat/completions?api-key={KEY}"
    everything = json.dumps(judge.describe()) + judge.cache_path.read_text() + judge.cache_path.name
    assert SECRET not in everything and KEY not in everything and "alice" not in everything
    chat_server.statuses = [500]
    failing = OpenAIChatJudge("m", base_url=url, max_retries=0, api_key_env="none")
    with pytest.raises(JudgeEndpointError) as err:
        failing.judge(ITEMS[:1])
    assert SECRET not in str(err.value) and KEY not in str(err.value) and host_port in str(err.value)


def test_requests_never_go_out_unauthenticated_by_accident(chat_server, monkeypatch):  # noqa: F811
    monkeypatch.delenv("SAFEVLM_TEST_KEY", raising=False)
    with pytest.raises(JudgeError, match="'SAFEVLM_TEST_KEY' holding the API key is not set.*api_key_env=None"):
        OpenAIChatJudge("m", base_url=chat_server.base_url, api_key_env="SAFEVLM_TEST_KEY")
    with pytest.raises(ValueError, match="looks like a key itself"):
        OpenAIChatJudge("m", base_url=chat_server.base_url, api_key_env=KEY)
    assert chat_server.requests == []
    monkeypatch.setenv("SAFEVLM_TEST_KEY", KEY)
    judge = OpenAIChatJudge("m", base_url=chat_server.base_url, api_key_env="SAFEVLM_TEST_KEY", cache_dir=None)
    judge.judge(ITEMS[:1])
    assert chat_server.requests[0]["auth"] == f"Bearer {KEY}" and KEY not in json.dumps(judge.describe())
    OpenAIChatJudge("m", base_url=chat_server.base_url, api_key_env=None, cache_dir=None).judge(ITEMS[:1])
    assert chat_server.requests[1]["auth"] is None  # only because the caller said so


def test_an_unparseable_reply_in_an_old_cache_is_asked_again(chat_server, tmp_path):  # noqa: F811
    judge = OpenAIChatJudge("m", base_url=chat_server.base_url, cache_dir=tmp_path, api_key_env=None)
    judge.judge(ITEMS[:1])
    lines = judge.cache_path.read_text().splitlines()
    entry = json.loads(lines[1])
    lines[1] = json.dumps({**entry, "raw": "no verdict here"})  # what the old code cached forever
    judge.cache_path.write_text("\n".join(lines) + "\n")
    rerun = OpenAIChatJudge("m", base_url=chat_server.base_url, cache_dir=tmp_path, api_key_env=None)
    assert rerun.judge(ITEMS[:1])[0].parsed and rerun.requests_sent == 1


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="safevlm")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["eval", *argv]))


def test_eval_cli_refuses_a_pasted_key_and_writes_nothing(saved_safevlm, tmp_path, capsys, chat_server):  # noqa: F811
    out = tmp_path / "eval"
    argv = ["--model", str(saved_safevlm), "--bench", f"xstest:{XSTEST}", "--out", str(out), "--limit", "1"]
    argv += ["--judge", "openai:m", "--judge-base-url", chat_server.base_url, "--judge-api-key-env", KEY]
    assert _cli(argv) == 2
    err = capsys.readouterr().err
    assert "--judge-api-key-env expects the NAME of an environment variable" in err and KEY not in err
    assert not out.exists() and chat_server.requests == []


def test_eval_report_and_cache_hold_no_credentials(saved_safevlm, tmp_path, chat_server, single_thread):  # noqa: F811
    out = tmp_path / "eval"
    host_port = chat_server.base_url.split("//", 1)[1].split("/", 1)[0]
    url = f"http://alice:{SECRET}@{host_port}/v1?api-key={KEY}"
    argv = ["--model", str(saved_safevlm), "--bench", f"xstest:{XSTEST}", "--out", str(out), "--limit", "2"]
    argv += ["--judge", "openai:m", "--judge-base-url", url, "--judge-api-key-env", "none"]
    assert _cli([*argv, "--max-new-tokens", "2", "--no-progress", "--no-plots"]) == 0
    assert len(chat_server.requests) == 2
    written = [path.read_text() for path in out.rglob("*") if path.is_file()]
    assert written and all(SECRET not in text and KEY not in text for text in written)
    report = json.loads((out / "report.json").read_text())
    assert "REDACTED@" in report["judge"]["base_url"] and "--judge-base-url" in report["command"]
