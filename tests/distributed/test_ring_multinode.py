"""A two-node launch simulated on this machine: two torchrun agents (--nnodes=2, one process each)
meet through c10d rendezvous on a free localhost port, and the ring runs across the "nodes" on
gloo. Each rank must print the worker's sentinel line (a crash or a silent hang cannot pass)."""

from __future__ import annotations

import os
import subprocess
import sys

from ring_cases import free_port

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_node_torchrun_rendezvous():
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=hardneg-ring-test",
        "--max_restarts=0",
        os.path.join(HERE, "ring_multinode_worker.py"),
    ]
    # The worker runs as a file: its helpers come from PYTHONPATH, not from pytest's paths.
    path = [HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, path)))
    nodes = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for _ in range(2)
    ]
    outputs = []
    for p in nodes:
        try:
            out, _ = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for q in nodes:
                q.kill()
            raise
        outputs.append(out)
        assert p.returncode == 0, out
    text = "\n".join(outputs)
    assert text.count("RING_MULTINODE_OK") == 2, text
    assert {f"rank={r}" for r in range(2)} <= set(text.split()), text
