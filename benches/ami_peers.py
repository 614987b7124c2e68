#!/usr/bin/env python3
"""Runs the shared AMI client peer benchmark (../shared/bench/peers) with
callbridge added as a peer, so its numbers and the peers' come from the same
run on the same machine.

    cargo build --release --example ami_bench_peer
    python3 benches/ami_peers.py --sizes 1000000 --runs 3 [--only callbridge,asterisk-rs-ami,panoramisk]

Peers that are not installed are skipped by the harness (install them with
../shared/bench/peers/run.sh --install). The event files must exist first:
../shared/bench/peers/run.sh generates them (or gen_events.py by hand).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.environ.get("AMI_PEERS_DIR", os.path.join(ROOT, "..", "shared", "bench", "peers"))
BIN = os.path.join(ROOT, "target", "release", "examples", "ami_bench_peer")

sys.path.insert(0, os.path.abspath(PEERS))
import bench  # noqa: E402  (the shared harness)

_peers = bench.peers


def peers(work):
    p = _peers(work)
    p.insert(0, dict(id="callbridge", label="callbridge: AMI connection + normalizer, one core",
                     version="0.1.0", lang="rust", counts=True, cmd=[BIN], need=[BIN]))
    return p


bench.peers = peers
if __name__ == "__main__":
    bench.main()
