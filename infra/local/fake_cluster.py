"""infra/aws/cluster.yaml as a cluster that autoscales on this one machine: Ray's fake multi-node provider.

    python infra/local/fake_cluster.py --gcs-port 6379 > /tmp/ldm-fake/autoscaler.yaml
    RAY_FAKE_CLUSTER=1 ray start --head --num-cpus=0 --port=6379 --autoscaling-config=/tmp/ldm-fake/autoscaler.yaml

The node types, their min/max workers, the head's resources, the idle timeout and the upscaling speed come
from the AWS config, so a change of its shape shows up here; the worker types' CPUs are divided by
`--cpu-scale` and their counts capped by `--max-per-type` and `--max-total`, so the whole cluster fits one
small machine (every node's raylet, agents and workers share its memory). A
"node" is a raylet the autoscaler starts on this machine (no VM, no SSH, no setup commands); GPUs are
logical only. infra/README.md ("An autoscaling cluster on one machine") walks through it;
tests/test_cluster.py runs exactly that walkthrough.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import yaml

AWS_YAML = Path(__file__).resolve().parents[1] / "aws" / "cluster.yaml"
FAKE_HEAD_TYPE = "ray.head.default"  # the type name Ray's fake provider gives its head node
WORKER_OBJECT_STORE_BYTES = 400 * 1024**2  # every fake node's object store lives in this one machine's memory


def fake_autoscaling_config(aws: dict, *, gcs_port: int, cpu_scale: float = 8.0, max_per_type: int = 2,
                            max_total: int = 3) -> dict:
    """The autoscaling config for `RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`, derived from a
    cluster-launcher config (`aws`, as loaded from infra/aws/cluster.yaml)."""
    head_type = aws["head_node_type"]
    types = {FAKE_HEAD_TYPE: {"resources": dict(aws["available_node_types"][head_type]["resources"]),
                              "node_config": {}, "max_workers": 0}}
    total = 0
    for name, spec in aws["available_node_types"].items():
        if name == head_type:
            continue
        resources = dict(spec["resources"])
        if "CPU" in resources:
            resources["CPU"] = max(1, math.floor(resources["CPU"] / cpu_scale))
        resources["object_store_memory"] = WORKER_OBJECT_STORE_BYTES
        cap = min(spec.get("max_workers", max_per_type), max_per_type)
        types[name] = {"resources": resources, "node_config": {},
                       "min_workers": min(spec.get("min_workers", 0), cap), "max_workers": cap}
        total += cap
    return {
        "cluster_name": f"{aws['cluster_name']}-fake",
        "max_workers": min(aws["max_workers"], total, max_total),
        "upscaling_speed": aws.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": aws.get("idle_timeout_minutes", 5),
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{gcs_port}",
            # Nodes are processes here: no node updaters (SSH, setup commands), no launch-config hashes.
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        # Required by the autoscaler's config schema, unused by the fake provider.
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print a fake multi-node autoscaling config derived from a cluster-launcher YAML.")
    parser.add_argument("--from", dest="source", default=str(AWS_YAML), help="cluster-launcher YAML (default: %(default)s)")
    parser.add_argument("--gcs-port", type=int, default=6379, help="the head's --port (default: %(default)s)")
    parser.add_argument("--cpu-scale", type=float, default=8.0, help="divide worker CPUs by this (default: %(default)s)")
    parser.add_argument("--max-per-type", type=int, default=2, help="cap each worker type's max_workers (default: %(default)s)")
    parser.add_argument("--max-total", type=int, default=3, help="cap the cluster's max_workers (default: %(default)s)")
    args = parser.parse_args(argv)
    aws = yaml.safe_load(Path(args.source).read_text())
    config = fake_autoscaling_config(aws, gcs_port=args.gcs_port, cpu_scale=args.cpu_scale, max_per_type=args.max_per_type,
                                     max_total=args.max_total)
    yaml.safe_dump(config, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
