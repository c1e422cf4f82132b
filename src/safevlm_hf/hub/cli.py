"""`safevlm push`: upload a saved SafeVLM checkpoint folder to the Hugging Face Hub (one commit).

Wire it into the `safevlm` console script with `register(subparsers)`; the sub-command sets `func=run_push`.
"""

from __future__ import annotations

import argparse

from huggingface_hub.errors import HfHubHTTPError

from ..cli_support import EXIT_SERVICE_ERROR, fail
from .push import CheckpointFolderError, build_push_call, push_to_hub


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `push` sub-command to a `safevlm` argument parser's sub-parsers; returns the new parser."""
    parser = subparsers.add_parser(
        "push",
        help="Upload a saved SafeVLM checkpoint (weights, code, processor, card) to the Hub in one commit.",
        description=(
            "Upload the files a trust_remote_code load needs from a folder written by model.save_pretrained + "
            "processor.save_pretrained, in a single commit; every file is listed before the upload. Other files in "
            "the folder are left out (and listed); symbolic links, special files and names that point outside the "
            "folder are refused. "
            "The token comes from --token-env, else from HF_TOKEN or `hf auth login`."
        ),
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="The saved checkpoint folder.")
    parser.add_argument("--repo-id", required=True, metavar="ID", help="Target repository, e.g. my-org/my-safevlm.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private (if it is new).")
    parser.add_argument(
        "--revision", default=None, metavar="REV", help="Branch to commit to (created from main if missing)."
    )
    parser.add_argument(
        "--token-env",
        default=None,
        metavar="VAR",
        help="Name of the environment variable that holds the Hub token (e.g. HF_TOKEN).",
    )
    parser.add_argument(
        "--commit-message", default=None, help="Commit message (default: 'Upload SafeVLM checkpoint (N files)')."
    )
    parser.set_defaults(func=run_push)
    return parser


def run_push(args: argparse.Namespace) -> int:
    """Run `safevlm push`; returns the exit status (0 pushed, 2 bad arguments or folder, 1 Hub error)."""
    try:
        call = build_push_call(args)
    except (CheckpointFolderError, ValueError) as err:
        return fail("push", str(err))
    branch = f" (branch {call.revision})" if call.revision else ""
    # Every file is listed before anything is sent, so that the user sees exactly what leaves the machine.
    print(f"Pushing {len(call.files)} files from {call.model_dir} to {call.repo_id}{branch}:")
    for name in call.files:
        print(f"  {name}")
    try:
        info = push_to_hub(**call.kwargs())
    except HfHubHTTPError as err:
        return fail("push", f"the Hub refused the upload to {call.repo_id}: {err}", EXIT_SERVICE_ERROR)
    repo_id = info.repo_url.repo_id  # the full id (owner/name), also when --repo-id gave only a name
    print(f"Committed {info.oid}: {info.commit_url}")
    print(
        "Load this exact commit with:\n"
        f'  AutoModel.from_pretrained("{repo_id}", trust_remote_code=True, revision="{info.oid}")'
    )
    return 0


__all__ = ["register", "run_push"]
