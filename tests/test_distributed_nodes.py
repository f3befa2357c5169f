"""--ray on a cluster of two nodes on this machine, one of which cannot see the output folder.

The second node is started in a mount namespace of its own (``unshare -m``) with an empty tmpfs over one folder: to
that node the folder is not there, as a local disk of another machine would not be. An -o in that folder is refused
with one line before any weight is read; an -o elsewhere converts on both nodes. Skips where Ray's CLI, unshare or
mounting (root) is missing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the distributed extra (Ray) is not installed")


def _sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_nodes(tmp_path):
    """(address, hidden folder): a head node, and a worker node to which ``hidden`` is an empty tmpfs."""
    ray = shutil.which("ray")
    if ray is None or shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs Ray's CLI, unshare and root")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    if _sh(["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", str(hidden)]).returncode:
        pytest.skip("mount namespaces are not permitted here")
    address = f"127.0.0.1:{_free_port()}"
    # one token for the head, the worker node and convert (Ray authenticates its RPCs with a shared token)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    try:
        head = _sh([ray, "start", "--head", f"--port={address.split(':')[1]}", "--num-cpus=1",
                    "--include-dashboard=false"], env=env)
        assert head.returncode == 0, head.stderr
        worker = _sh(["unshare", "-m", "--propagation", "private", "sh", "-c",
                      f"mount -t tmpfs tmpfs {hidden} && exec {ray} start --address={address} --num-cpus=1"], env=env)
        assert worker.returncode == 0, worker.stderr
        count = ("import ray, time; ray.init(address=%r, log_to_driver=False)\n"
                 "for _ in range(60):\n"
                 "    if sum(n['Alive'] for n in ray.nodes()) == 2: break\n"
                 "    time.sleep(1)\n"
                 "print(sum(n['Alive'] for n in ray.nodes()))") % address
        assert _sh([sys.executable, "-c", count], env=env).stdout.strip() == "2"
        yield address, hidden, env
    finally:
        _sh([ray, "stop", "--force"], env=env)


def _convert(ckpt: Path, out: Path, address: str, env: dict) -> subprocess.CompletedProcess:
    return _sh([sys.executable, "-m", "l4export.cli", "convert", str(ckpt), "-o", str(out), "--quant", "int4",
                "--ray", address], env=env)


def test_output_folder_a_node_cannot_see_is_refused(two_nodes, qscout, tmp_path):
    address, hidden, env = two_nodes
    r = _convert(qscout, hidden / "out", address, env)
    assert r.returncode == 2, r.stderr
    assert "not visible from Ray node(s)" in r.stderr and "every node shares" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (hidden / "out").exists() and not list(hidden.iterdir())  # nothing half-written
    # the same cluster converts into a folder both nodes see
    (tmp_path / "seen").mkdir()
    r = _convert(qscout, tmp_path / "seen" / "out", address, env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "seen" / "out" / "model.onnx").is_file()
