"""What a training stage needs from the Ray cluster it runs on, checked before any work starts.

* **Resources.** A stage needs `num_workers` x `resources_per_worker` for its Ray Train workers plus
  `data.reserved_cpus` CPUs for Ray Data's read and decode tasks. A fixed-size cluster (a laptop, a static
  `ray start` cluster) is judged by its size now: too small fails at once (`check_cpu_budget`), because
  training would starve Ray Data and hang. An autoscaling cluster (`infra/aws/cluster.yaml`,
  `infra/k8s/raycluster.yaml`: a head with 0 CPUs, workers from zero) is judged by what it can become: the
  stage asks the autoscaler for its bundles (Ray's autoscaler SDK), waits with a visible message, and gives
  up after `ray.autoscaler_timeout_s` naming what never arrived.
* **Storage.** On a cluster of more than one node, or one whose autoscaler adds nodes, a local path is
  another folder on every node: `data.uri`, `run.output_uri` and `run.storage_path` must be `s3://` or on a
  shared filesystem (`storage.shared_filesystem`), or the stage fails before any work.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from ray.autoscaler.sdk import request_resources

from ldm_core.config import ConfigError
from pipelines.config.data import DataConfig
from pipelines.config.sections import RaySection, ScalingSection
from pipelines.platform.runtime import init_ray
from pipelines.platform.storage import resolve

log = logging.getLogger(__name__)

# The v1 autoscaler (`ray start --autoscaling-config`, the cluster launcher, KubeRay's default) publishes its
# status under this internal-KV key every update; v2 marks itself in the autoscaler-state namespace instead.
AUTOSCALER_STATUS_KEY = "__autoscaling_status"
POLL_S = 2.0
REPORT_EVERY_S = 30.0
GCS_TIMEOUT_S = 60.0


class ClusterError(RuntimeError):
    """The cluster cannot run the stage as configured (one line, said before any work)."""


def autoscaler_running() -> bool:
    """Whether the connected cluster has an autoscaler that can add nodes (v1 or v2).

    Every Ray head runs a v1 monitor; without an autoscaling config (`ray.init()`, a plain `ray start --head`)
    it is read-only and names each node's type after the node itself ("node_<id>"). A real autoscaler reports
    the node types of its config ("cpu_worker", "ray.head.default", ...)."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2(fetch_from_server=True):
        return True
    status = _internal_kv_get(AUTOSCALER_STATUS_KEY)
    if status is None:
        return False
    mapping = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(node_type != f"node_{node_id}" for node_id, node_type in mapping.items())


def _alive_node_infos() -> list:
    """The GCS's records of the cluster's alive nodes, asked through this driver's own GCS connection, with a
    timeout. Not `ray.nodes()` or `ray.cluster_resources()`: those go through a second GCS client (Ray's
    global state accessor) that waits without a timeout, and on CI (1024 open files, an hour of Ray sessions
    in one process) that wait was seen never to end."""
    from ray._private.worker import global_worker
    from ray.core.generated import gcs_pb2

    infos = global_worker.gcs_client.get_all_node_info(timeout=GCS_TIMEOUT_S)
    return [n for n in infos.values() if n.state == gcs_pb2.GcsNodeInfo.ALIVE]


def alive_nodes() -> int:
    return len(_alive_node_infos())


def cluster_resources() -> dict[str, float]:
    """The total resources of the alive nodes (what `ray.cluster_resources()` returns)."""
    total: dict[str, float] = defaultdict(float)
    for node in _alive_node_infos():
        for name, value in node.resources_total.items():
            total[name] += value
    return dict(total)


# ---------------------------------------------------------------------------------------------------
# Storage every node can reach
# ---------------------------------------------------------------------------------------------------


def local_paths(cfg) -> list[tuple[str, str]]:
    """(field, value) of each storage location in `cfg` (a PipelineConfig) that is a path on this node's disk."""
    fields = [("data.uri", cfg.data.uri), ("run.output_uri", cfg.run.output_uri),
              ("run.storage_path", cfg.run.storage_path), ("encode.output_uri", cfg.encode.output_uri),
              ("sample.out_dir", cfg.sample.out_dir)]
    return [(name, value) for name, value in fields if value is not None and resolve(value, cfg.storage).scheme == "file"]


def check_local_paths(cfg, num_nodes: int, autoscaling: bool) -> None:
    """Fail when a local path would mean a different folder on every node: on more than one node, or on an
    autoscaling cluster (whose workers are other machines), unless `storage.shared_filesystem` says every node
    mounts the same one. A relative path in the YAML is already absolute here, under the job's working dir,
    which Ray unpacks separately on every node."""
    if cfg.storage.shared_filesystem or (num_nodes <= 1 and not autoscaling):
        return
    found = local_paths(cfg)
    if found:
        name, value = found[0]
        nodes = f"{num_nodes} node{'s' if num_nodes != 1 else ''}" + (" and an autoscaler that adds more" if autoscaling else "")
        raise ClusterError(f"{name}={value} is a local path but the cluster has {nodes}: use s3:// or a shared "
                           f"filesystem (then set storage.shared_filesystem=true)")


def check_cluster_paths(cfg) -> None:
    """`check_local_paths` against the connected cluster."""
    check_local_paths(cfg, alive_nodes(), autoscaler_running())


def connect(cfg) -> None:
    """Start or join Ray as `cfg.ray` says, and check that the config's local paths work on that cluster."""
    init_ray(cfg.ray)
    check_cluster_paths(cfg)


# ---------------------------------------------------------------------------------------------------
# Resources for a training stage
# ---------------------------------------------------------------------------------------------------


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"


@dataclass(frozen=True)
class StageNeeds:
    """What a training stage reserves: its Train workers' bundles and the CPUs kept free for Ray Data."""

    workers: int
    per_worker: dict[str, float]
    data_cpus: float

    @classmethod
    def of(cls, scaling: ScalingSection, data: DataConfig) -> "StageNeeds":
        """`data` unfitted (`reserved_cpus` unset): the least Ray Data can run with, half a CPU."""
        return cls(scaling.num_workers, scaling.resources_per_worker(), data.fit(0).reserved_cpus)

    def bundles(self) -> list[dict[str, float]]:
        return [dict(self.per_worker)] * self.workers + ([{"CPU": self.data_cpus}] if self.data_cpus else [])

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for bundle in self.bundles():
            for k, v in bundle.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def describe(self) -> str:
        text = f"{self.workers} x {_fmt(self.per_worker)} for Train"
        return text + (f" + {self.data_cpus:g} CPU for Ray Data" if self.data_cpus else "")

    def missing(self, have: dict[str, float]) -> dict[str, float]:
        """Per resource, how much the cluster's totals lack (empty when the stage fits)."""
        return {k: v - have.get(k, 0.0) for k, v in self.totals().items() if have.get(k, 0.0) + 1e-9 < v}


def _have(needs: StageNeeds) -> str:
    total = cluster_resources()
    return ", ".join(f"{total.get(k, 0.0):g} {k}" for k in needs.totals())


def check_cpu_budget(total_cpus: float, scaling, data: DataConfig, section: str = "stage_a") -> None:
    """Fail before training when Train workers would leave Ray Data no CPU (its read and decode tasks would
    never be scheduled and training would hang).

    `scaling`: any object with `num_workers` and `cpus_per_worker` (pipelines.config.sections.ScalingSection);
    `section`: the config section it came from, named in the error. `data.reserved_cpus = 0` turns the
    check off. For fixed-size clusters: pipelines/platform/cluster.py asks an autoscaling one for the CPUs instead.
    Unset `data` CPU fields are judged as `DataConfig.fit` would choose them on this cluster.
    """
    used = scaling.num_workers * scaling.cpus_per_worker
    data = data.fit(total_cpus - used)
    if data.reserved_cpus and total_cpus - used < data.reserved_cpus:
        raise ConfigError(
            f"CPU budget: {section}.scaling.num_workers x {section}.scaling.cpus_per_worker = "
            f"{scaling.num_workers} x {scaling.cpus_per_worker} = {used:g} of the cluster's {total_cpus:g} CPUs, "
            f"leaving {total_cpus - used:g} < data.reserved_cpus = {data.reserved_cpus:g} for Ray Data's read and "
            f"decode tasks (data.cpus_per_task = {data.cpus_per_task:g} each), which would never be scheduled "
            f"(training hangs). Lower cpus_per_worker (fractions are fine) or num_workers, or add nodes."
        )


def ensure_resources(scaling: ScalingSection, data: DataConfig, ray_cfg: RaySection, section: str) -> DataConfig:
    """Make sure the connected cluster can run a training stage's workers next to its Ray Data tasks, and return
    `data` fitted to it (`DataConfig.fit`: its unset CPU fields chosen from the CPUs the workers leave free).

    Fixed-size cluster: `check_cpu_budget` against its CPUs now (fails at once). Autoscaling cluster: when its
    totals fall short, request the stage's bundles from the autoscaler and wait up to
    `ray_cfg.autoscaler_timeout_s`. The request is withdrawn once answered (or given up): Ray Train's own
    placement group keeps the nodes busy, and a withdrawn request never pins a long-lived cluster at this size.
    Placement (one bundle per node for STRICT_SPREAD) is Ray Train's placement group's business: the
    autoscaler also launches nodes for pending placement groups.
    """
    if not autoscaler_running():
        total_cpus = cluster_resources().get("CPU", 0)
        check_cpu_budget(total_cpus, scaling, data, section=section)
        return fit_data(scaling, data, section, total_cpus)
    needs = StageNeeds.of(scaling, data)
    if not needs.missing(have := cluster_resources()):
        return fit_data(scaling, data, section, have.get("CPU", 0))
    request_resources(bundles=needs.bundles())
    started = time.monotonic()
    print(f"[{section}] waiting for the autoscaler: need {needs.describe()} (the cluster has {_have(needs)})", flush=True)
    try:
        reported = started
        while missing := needs.missing(cluster_resources()):
            now = time.monotonic()
            if now - started > ray_cfg.autoscaler_timeout_s:
                raise ClusterError(
                    f"{section}: the autoscaler did not provide {needs.describe()} within "
                    f"ray.autoscaler_timeout_s={ray_cfg.autoscaler_timeout_s:g} s: still missing {_fmt(missing)} "
                    f"(the cluster has {_have(needs)}); see `ray status` for infeasible requests and the node types' "
                    f"max_workers"
                )
            if now - reported >= REPORT_EVERY_S:
                print(f"[{section}] still waiting for the autoscaler ({now - started:.0f} s): missing {_fmt(missing)}",
                      flush=True)
                reported = now
            time.sleep(POLL_S)
        print(f"[{section}] the autoscaler provided it in {time.monotonic() - started:.0f} s "
              f"(the cluster has {_have(needs)})", flush=True)
    finally:
        request_resources(bundles=[])
    return fit_data(scaling, data, section, cluster_resources().get("CPU", 0))


def fit_data(scaling, data: DataConfig, section: str, total_cpus: float) -> DataConfig:
    """`data.fit` for the CPUs the stage's workers leave free of the cluster's `total_cpus`, said in one line when
    it chose."""
    free = total_cpus - scaling.num_workers * scaling.cpus_per_worker
    fitted = data.fit(free)
    if fitted.cpus_per_task != data.cpus_per_task:
        log.info("%s: data.cpus_per_task = %g, data.reserved_cpus = %g (unset: chosen for the %g CPUs its Train "
                 "workers leave free)", section, fitted.cpus_per_task, fitted.reserved_cpus, free)
    return fitted
