"""What profiling costs: a designed sample of configurations (families, grids, interpolation,
held-out checks and refinement: edgeprune/latency/sampling.py) and a real sampled profile; and a
device with no table of its own profiled first where that takes minutes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeprune.latency.layers import LayerConfig
from edgeprune.latency.sampling import SamplePlan, families


def _conv(cin: int, cout: int, groups: int = 1, hw: int = 14, **kw) -> LayerConfig:
    return LayerConfig("conv", cin, cout, hw, hw, (3, 3), (1, 1), (1, 1, 1, 1), groups, "relu", **kw)


def _bilinear(cfg: LayerConfig) -> float:  # a conv's work: a * cin * cout + b * cin + c * cout + d
    return 0.002 * cfg.cin * cfg.cout + 0.01 * cfg.cin + 0.03 * cfg.cout + 0.5


def test_a_family_is_its_grid_and_the_rest_interpolated_exactly_where_latency_is_bilinear():
    convs = [_conv(i, o) for i in range(8, 129, 8) for o in range(8, 257, 8)]  # 16 x 32 widths
    depthwise = [_conv(c, c, groups=c) for c in range(16, 257, 16)]
    fams, full = families(convs + depthwise, points=4)
    assert not full and len(fams) == 2
    plan = SamplePlan.of(convs + depthwise, points=4)
    grid = plan.to_measure()
    assert len(grid) == 4 * 4 + 4  # two axes of 4 widths, and one axis (depthwise: channels in = out)
    assert {(c.cin, c.cout) for c in grid if c.groups == 1} >= {(8, 8), (8, 256), (128, 8), (128, 256)}
    assert all(c.groups == c.cin == c.cout for c in grid if c.groups != 1)
    measured = {c.key: _bilinear(c) if c.groups == 1 else 0.01 * c.cin + 0.2 for c in grid}
    rest = plan.interpolated(measured)
    assert len(rest) == len(convs) + len(depthwise) - len(grid)
    for cfg in convs + depthwise:
        if cfg.key in rest:
            truth = _bilinear(cfg) if cfg.groups == 1 else 0.01 * cfg.cin + 0.2
            assert rest[cfg.key] == pytest.approx(truth, rel=1e-9)


def test_what_cannot_be_interpolated_is_measured_in_full():
    concat = [LayerConfig("concat", c, c, 8, 8, extra=(c // 2, c // 2)) for c in range(16, 129, 16)]
    other = [LayerConfig("other:Resize", c, c, 8, 8, detail="abc") for c in range(16, 129, 16)]
    small = [_conv(i, o, hw=7) for i in (8, 16) for o in (8, 16)]  # no more members than its grid
    fams, full = families(concat + other + small, points=3)
    assert not fams and len(full) == len(concat + other + small)
    # a grouped conv (its group count fixed) is a family of its own, interpolated like any conv
    grouped = [_conv(c, c, groups=4) for c in range(16, 129, 16)]
    fams, full = families(grouped + small, points=3)
    assert len(fams) == 1 and fams[0].one_axis and fams[0].grid(3)[0].groups == 4 and full == small


def test_a_family_the_interpolation_misses_is_refined_then_measured_in_full():
    convs = [_conv(i, o) for i in range(8, 257, 8) for o in range(8, 257, 8)]  # 32 x 32 widths
    plan = SamplePlan.of(convs, points=3)
    assert plan.level == {0: 3}
    assert plan.refine({0: [0.01, 0.02, 0.03]}) == [] and plan.level == {0: 3}  # within the tolerance
    assert plan.refine({0: [0.01, 0.02, 0.3]}) == [0] and plan.level == {0: 5}  # one far off: a finer grid
    assert len(plan.to_measure()) == 25
    plan.refine({0: [0.08, 0.09, 0.1]})  # still off (median): finer again
    assert plan.level == {0: 9}
    plan.refine({0: [0.08, 0.09, 0.1]})
    plan.refine({0: [0.08, 0.09, 0.1]})
    assert plan.level == {0: 0} and len(plan.to_measure()) == len(convs)  # finally, every configuration
    # held-out configurations are drawn from those not measured, per family, reproducibly
    plan = SamplePlan.of(convs, points=3)
    grid = {c.key for c in plan.to_measure()}
    held = plan.held_out(seed=0)
    assert held == plan.held_out(seed=0) and len(held) == 12  # 2 % of 1015, at most 12 a family
    assert not any(c.key in grid for _, c in held)


def test_a_sampled_profile_measures_grids_and_held_out_units_and_interpolates_the_rest(tmp_path, cli, fast_device):
    out = tmp_path / "resnet20.json"
    # step 8: families of many widths, so a refinement (held-out units of a few microseconds miss by
    # more than 5 % on a busy host) still leaves most of a family interpolated
    args = ["profile", "--model", "resnet20", "--data", "fashion-mnist", "--device", fast_device, "--step", "8",
            "--sample", "2", "--calibrate", "1", "--out", str(out), "--json"]  # fmt: skip
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    s = summary["sampling"]
    assert s["points"] == 2 and s["interpolated"] > 0 and s["held_out"]["n"] > 0
    assert "interpolated" in r.stderr and "held-out" in r.stderr
    table = json.loads(out.read_text())
    entries = table["entries"]
    assert len(entries) == s["measured"] + s["interpolated"] and s["measured"] >= s["held_out"]["n"]
    interpolated = [e for e in entries.values() if e.get("interpolated")]
    assert len(interpolated) == s["interpolated"] and all(e["median_ms"] >= 0 for e in interpolated)
    # a plan's prediction reads interpolated entries as measured ones
    r = cli("predict", "--model", "resnet20", "--data", "fashion-mnist", "--table", str(out), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["predicted_ms"] > 0, r.stderr
    # profiling again measures nothing new: the grids and held-out units are in the table
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["meta"]["profile_seconds"] == pytest.approx(
        table["meta"]["profile_seconds"], abs=1
    )
    # measured in full, the interpolated entries become measurements
    r = cli(*args[:-5], "--sample", "0", "--calibrate", "1", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert not any(e.get("interpolated") for e in json.loads(out.read_text())["entries"].values())


def _other_setups_table(tmp_path, source: str, device: str, model: str, **meta) -> None:
    """latency_tables/DEVICE/MODEL.json under tmp_path: the table at `source`, as if profiled on
    another CPU (its profile time in `meta`)."""
    d = json.loads(Path(source).read_text())
    d["fingerprint"] = {**d["fingerprint"], "cpu": "Another CPU"}
    d["meta"] = {**d["meta"], **meta}
    d["step"] = 16  # a profile of this device at its step measures few configurations
    if meta.get("profile_seconds") is None:
        d["meta"].pop("profile_seconds", None)
    target = tmp_path / "latency_tables" / device / f"{model}.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(d))


def test_profiling_first_is_decided_by_the_other_setup_s_recorded_time(tiny_run, tmp_path):
    from edgeprune.devices import Device
    from edgeprune.latency.profiler import PROFILE_FIRST_S, profiles_first
    from edgeprune.latency.table import LatencyTable

    dev = Device.load(tiny_run["device"])
    said = []
    own = LatencyTable.load(tiny_run["table"])
    assert not profiles_first(own, dev, "resnet20", said.append) and not said  # this setup's own: used
    for seconds, first, line in [
        (60, True, "profiling it first (about "),
        (PROFILE_FIRST_S * 15, False, "profiling it would take about 6"),  # 60 min of units, the calibration
        (None, False, "profiling it would take a while (the table did not record its time)"),
    ]:
        _other_setups_table(tmp_path / str(seconds), tiny_run["table"], "fast-ort", "resnet20", profile_seconds=seconds)
        other = LatencyTable.load(tmp_path / str(seconds) / "latency_tables" / "fast-ort" / "resnet20.json")
        said.clear()
        assert profiles_first(other, dev, "resnet20", said.append) is first
        assert (
            len(said) == 1 and said[0].startswith("fast-ort has no table of its own for resnet20: ") and line in said[0]
        )


def test_the_profile_estimate_counts_the_calibration_models_windows():
    """At 224 the calibration, not the units, is most of a profile: 15 windows of each model the
    other setup calibrated on, timed as this device's protocol times a window, and each export."""
    from types import SimpleNamespace

    from edgeprune.latency.measurement import Protocol
    from edgeprune.latency.profiler import CALIBRATION_S, EXPORT_S, profile_estimate

    points = {"dense": {"measured_ms": 70.0}, "plan": {"measured_ms": 0.5}}
    other = SimpleNamespace(meta={"profile_seconds": 100, "calibration_points": points})
    # 70 ms: 2 warm-up runs and 5 timed (0.49 s); 0.5 ms: 0.03 s of warm-up and 0.15 s timed
    assert profile_estimate(other, Protocol()) == pytest.approx(100 + 15 * 0.49 + 15 * 0.18 + 2 * EXPORT_S)
    assert profile_estimate(SimpleNamespace(meta={"profile_seconds": 100}), Protocol()) == 100 + CALIBRATION_S
    assert profile_estimate(SimpleNamespace(meta={}), Protocol()) is None


def test_prune_profiles_a_device_without_its_own_table_first(tiny_run, tmp_path, cli_here, monkeypatch):
    from edgeprune.latency.table import setup_name

    monkeypatch.chdir(tmp_path)  # ./latency_tables: this test's
    _other_setups_table(tmp_path, tiny_run["table"], "fast-ort", "resnet20", profile_seconds=30)
    r = cli_here("prune", "--weights", tiny_run["weights"], "--device", tiny_run["device"], "--data", "digits:16",
                 "--budget-ms", "80%", "--search", "random", "--evals", "4", "--measure-top", "1", "--heldout-images",
                 "200", "--out", tmp_path / "run", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "fast-ort has no table of its own for resnet20: profiling it first" in r.stdout + r.stderr
    from edgeprune.devices import Device

    own = tmp_path / "latency_tables" / "fast-ort" / setup_name(Device.load(tiny_run["device"]).fingerprint())
    table = json.loads((own / "resnet20.json").read_text())
    assert table["step"] == 16 and table["fingerprint"]["cpu"] != "Another CPU"  # the other table's step
    assert json.loads(r.stdout)["table"]["path"] == str(
        Path("latency_tables") / "fast-ort" / own.name / "resnet20.json"
    )
