"""The loop's own facts about a run, and the trainer's account of it kept apart as a claim (SPEC §9: "the
trainer's account is a claim").

Hyperparameters come from the committed trainer's source (research/hparams.py SourceValues: the block's
values on the lines whose hardware conditions hold here), backend and device from the loop's detection,
the machine's speed from the loop's own gauge (research/gauge.py); what the trainer's facts.json says is
recorded apart (runs/<n>/result.json "claims", the claims section after the summary block, the CLAIMED
columns) and decides nothing: not the optuna study, not the duplicate refusal, not the drift rule.

The end-to-end test runs the loop once on a stand-in trainer that trains DEPTH 2 and claims DEPTH 12 on an
H100 with 99999 steps in 1 s (about 60 s on a 2-core CPU); the others are quick.

Run: `uv run pytest tests/test_loop_facts.py`.
"""

from __future__ import annotations

import json
import statistics
from types import SimpleNamespace

import pytest

from agents.memory import duplicate_of
from research import results as R
from research.gauge import gauge, speed_of
from research.hparams import SourceValues, conditions, parse_block, static_truth
from research.ledger import BASELINE, replay, speed
from tests.test_loop import (FAKE_TRAINER, assert_clean, edit, git, loop_env, make_repo, read_rows, run_loop,
                             write_script)

THE_LIE = {"depth": 12, "backend": "cuda", "device": "NVIDIA H100 80GB HBM3", "num_steps": 99999,
           "training_seconds": 1.0, "peak_vram_mb": 81000.0, "mfu_percent": 99.0}
CLAIMED_HP = {"DEPTH": 12, "MATRIX_LR": 0.4, "VAL_BPB": 0.5}

# The stand-in trains DEPTH 2 (its block's line for this host) and says otherwise in its facts.json. Its
# HARDWARE comes from the environment, so the line in effect is not readable from the source alone: the
# loop probes it in the trainer's sandbox.
LIAR = FAKE_TRAINER.replace('HARDWARE = "cpu"\n', 'HARDWARE = "cpu" if os.environ.get("AUTORESEARCH_BACKEND") == "cpu" '
                            'else "gpu"\n', 1).replace(
    "    prepare.hand_over(",
    f"    facts.update({THE_LIE!r})\n    facts['hyperparams'] = {CLAIMED_HP!r}\n    prepare.hand_over(", 1)
assert LIAR.count("facts.update(") == 1 and "if os.environ.get(\"AUTORESEARCH_BACKEND\")" in LIAR


def _detected_device() -> str:
    import backends

    return backends.detect("cpu").device_name


@pytest.fixture(scope="module")
def lied(tiny_cache_root, tmp_path_factory):
    """One loop on the lying trainer: a baseline, then a change of MATRIX_LR (0.04 -> 0.05) that measures
    the same (discarded). The loop's gauge is on."""
    tmp = tmp_path_factory.mktemp("facts")
    repo = make_repo(tmp, LIAR)
    script = write_script(tmp, [edit("MATRIX_LR = 0.04", "MATRIX_LR = 0.05", "a higher matrix lr")])
    proc = run_loop(repo, "run", "--agent", "scripted", "--script", script, "--tag", "facts", "--baseline-runs", "1",
                    "--max-experiments", "1", "--no-confirm",
                    env=loop_env(tiny_cache_root, AUTORESEARCH_GAUGE_REPS="60", AUTORESEARCH_LOAD_METER="1"),
                    timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return SimpleNamespace(repo=repo, rows=read_rows(repo), out=proc.stdout)


def test_the_row_holds_the_loops_facts_and_the_claim_apart(lied):
    rows = lied.rows
    assert [r.status for r in rows] == ["keep", "discard"], [(r.status, r.note) for r in rows]
    device = _detected_device()
    for r, lr in zip(rows, (0.04, 0.05)):
        # from the committed source (the line in effect on this host, probed in the sandbox) and the detection
        assert r.hyperparams["DEPTH"] == 2 and r.hyperparams["MATRIX_LR"] == lr and r.hyperparams["VAL_BPB"] == 2.0
        assert r.backend == "cpu" and r.device == device != THE_LIE["device"]
        # the loop's gauge, read before and after the run: the speed the drift rule reads
        assert r.gauge_before_s > 0 and r.gauge_after_s > 0
        assert r.others_cpu is not None and 0 <= r.others_cpu < 64  # the cores others kept busy (the kernel's count)
        assert speed(r) == pytest.approx(2 / (r.gauge_before_s + r.gauge_after_s))
        # the claimed columns show the claim (and are documented as such)
        assert r.num_steps == 99999 and r.training_seconds == 1.0 and r.mfu_percent == 99.0
    header = (lied.repo / "results.tsv").read_text().split("\n")[0].split("\t")
    assert header[:5] == R.UPSTREAM_COLUMNS and header[-5:] == ["gauge_before_s", "gauge_after_s", "kind", "reason",
                                                                      "others_cpu"]
    assert set(R.CLAIMED) <= set(header)

    run = lied.repo / "runs" / str(rows[1].run)
    record = json.loads((run / "result.json").read_text())
    assert record["loop"]["hyperparams"]["DEPTH"] == 2 and record["loop"]["device"] == device
    assert record["loop"]["gauge_before_s"] == pytest.approx(rows[1].gauge_before_s, abs=1e-4)
    assert record["claims"]["device"] == THE_LIE["device"] and record["claims"]["hyperparams"] == CLAIMED_HP
    assert record["claims"]["num_steps"] == 99999 and "summary" not in record

    import prepare
    from research.run import CLAIMS_HEADER

    log = (run / "log.txt").read_text()
    summary = prepare.parse_summary(log)  # the summary block proper: the harness's and the loop's
    assert summary["val_bpb"] == pytest.approx(rows[1].val_bpb, abs=1e-6)
    assert summary["hyperparams"]["DEPTH"] == 2 and summary["device"] == device and summary["depth"] == 2
    assert summary["num_steps"] is None and summary["training_seconds"] is None  # not the loop's to say
    claims = log.split(CLAIMS_HEADER + "\n")[1]  # then, apart and labelled, what the trainer claimed
    assert "device:           NVIDIA H100 80GB HBM3" in claims and "num_steps:        99999" in claims
    assert json.loads(claims.split("hyperparams:")[1].strip().split("\n")[0]) == CLAIMED_HP
    assert_clean(lied.repo)


def test_the_branch_starts_with_this_hosts_values_one_line_each(lied):
    """The stand-in's HARDWARE comes from the environment, so which of its lines hold here was probed in its
    sandbox; the branch's first commit then wrote the values in effect as one line each (DEPTH 2, not the
    reference's 8 with a cpu override below it), and every run is of that trainer or a change to it."""
    repo = lied.repo
    commits = git(repo, "rev-list", "--reverse", "main..autoresearch/facts").splitlines()
    assert git(repo, "log", "-1", "--format=%s", commits[0]).startswith("Hyperparameters for this host, one line each")
    assert git(repo, "diff", "--name-only", "main", commits[0]) == "train_cuda.py"
    text = git(repo, "show", f"{commits[0]}:train_cuda.py")
    block = text.split("# --- hyperparameters ---")[1].split("# --- end hyperparameters ---")[0]
    assert "if HARDWARE" not in block and "\nDEPTH = 2\n" in block and "DEPTH = 8" not in block
    assert block.count("\nDEPTH = ") == 1 and "\nMATRIX_LR = 0.04\n" in block
    assert lied.rows[0].commit == commits[0][:7]
    assert "wrote the hyperparameters in effect on this host" in lied.out


def test_the_optuna_study_learns_the_source_not_the_claim(lied):
    """Every row is a trial with the values its committed trainer set, never what the trainer claimed."""
    from agents.tuner import OptunaAgent
    from tests.test_agents import _ctx, quiet

    rows = lied.rows
    ctx = _ctx(lied.repo, {r.trainer_hash for r in rows})  # with the sandbox it reads the trainer's conditions in
    ctx.history, ctx.branch = rows, "autoresearch/facts"
    agent = OptunaAgent(seed=0, console=quiet(), moves=None)
    assert agent.propose(ctx) is not None
    told = [t for t in agent.study.trials if t.user_attrs.get("run") is not None]
    assert len(told) == 2
    for t, lr in zip(told, (0.04, 0.05)):
        values = agent.space.decode(t.params)
        assert values["DEPTH"] == 2 and values["MATRIX_LR"] == pytest.approx(lr, rel=1e-6)
    assert agent.space.dims["DEPTH"].center == 2


def test_the_duplicate_refusal_compares_the_source_not_the_claim(lied):
    rows = lied.rows
    seen = {r.trainer_hash for r in rows}
    current = dict(rows[0].hyperparams)
    # what the trainer claimed it ran never ran: not a duplicate
    claimed = {**current, **{k: v for k, v in CLAIMED_HP.items() if k in current}}
    assert duplicate_of("new-hash", claimed, {"DEPTH", "MATRIX_LR", "VAL_BPB"}, rows, seen) is None
    # what its source set did run
    again = {**current, "MATRIX_LR": 0.05}
    why = duplicate_of("another-hash", again, {"MATRIX_LR"}, rows, seen)
    assert why and f"as run #{rows[1].run}" in why


def _run(val: float, trainer: str, note: str, gauge_s: float, steps: int, seconds: float) -> R.Row:
    return R.Row(commit=trainer[:7], val_bpb=val, memory_gb=80.0, status="rerun" if "rerun" in note else "keep",
                 description=note, trainer_hash=trainer, num_steps=steps, training_seconds=seconds, note=note,
                 branch="b", budget_s=60.0, gauge_before_s=gauge_s, gauge_after_s=gauge_s)


def test_the_drift_rule_reads_the_gauge_not_the_claimed_steps():
    """The best's runs claim wildly different steps per second (1 step/s, then 99999) on a machine whose gauge
    did not move: one stretch, every run counts. The same claims on a machine the gauge saw slow down by 30%:
    the speed moved (a re-run is due), and the earlier runs count only adjusted to that speed (or, when the
    rule cannot adjust, stop counting)."""
    base = [_run(2.50, "base", f"{BASELINE} 1/3", 0.10, 60, 60.0),
            _run(2.52, "base", f"{BASELINE} 2/3", 0.10, 99999, 1.0),
            _run(2.48, "base", f"{BASELINE} 3/3", 0.10, 1, 60.0)]
    rerun = _run(2.49, "base", "rerun of the best: 10 experiments", 0.10, 99999, 0.01)
    rerun.description = "rerun of the best (base)"
    st = replay(base + [rerun], 0.0005)
    assert len(st.best_runs) == 4 and st.drift is None and st.drift_reason is None
    assert st.best == pytest.approx(statistics.fmean([2.50, 2.52, 2.48, 2.49]))
    slow = _run(2.55, "base", "rerun of the best: 10 experiments", 0.13, 60, 60.0)  # same claim as the first run
    slow.description = "rerun of the best (base)"
    st = replay(base + [rerun, slow], 0.0005)
    assert st.drift == pytest.approx(0.10 / 0.13 - 1) and "by the loop's gauge" in st.drift_reason
    assert st.speed_adjusted and len(st.best_runs) == 5 and st.best == pytest.approx(2.55)  # at the slow speed
    assert [r.val_bpb for r in st.current_runs] == [2.55]
    unadjustable = [_run(2.50, "base", "x", None, 60, 60.0)]  # a run without readings in the group: no fit
    st = replay(unadjustable + base + [rerun, slow], 0.0005)
    assert [r.val_bpb for r in st.best_runs] == [2.55] and not st.speed_adjusted
    # rows written before the gauge have no speed: they stay in the current stretch whatever they claim
    old = [_run(2.5, "base", f"{BASELINE} 1/2", None, 10, 60.0), _run(2.5, "base", f"{BASELINE} 2/2", None, 99999, 1.0)]
    assert speed(old[0]) is None and len(replay(old, 0.0005).best_runs) == 2


def test_the_gauge_is_a_fixed_workload_timed_by_the_loop(monkeypatch):
    readings = [gauge(reps=60) for _ in range(3)]
    assert all(0 < x < 30 for x in readings)
    assert speed_of(*readings) == pytest.approx(3 / sum(readings))
    assert speed_of(None, float("nan"), -1.0) is None and speed_of(0.5, None) == pytest.approx(2.0)
    monkeypatch.setenv("AUTORESEARCH_GAUGE_REPS", "0")
    assert gauge() is None  # off
    monkeypatch.setenv("AUTORESEARCH_GAUGE_REPS", "not a number")
    assert gauge(reps=1) > 0


def test_source_values_read_the_line_in_effect_without_asking_the_trainer():
    """Conditions on names the source fixes to constants are read from it; names bound any other way (or a
    trainer that rebinds names dynamically) leave the condition to the sandboxed probe."""
    text = FAKE_TRAINER
    conds = conditions(parse_block(text))
    assert static_truth(text, conds) == {'HARDWARE == "cpu"': True}
    assert SourceValues().values(text)["DEPTH"] == 2
    gpu = text.replace('HARDWARE = "cpu"\n', 'HARDWARE = "gpu"\n', 1)
    assert SourceValues().values(gpu)["DEPTH"] == 8
    for dynamic in ('globals()["HARDWARE"] = "gpu"\n', 'HARDWARE = "gpu"\n', 'def f():\n    global HARDWARE\n'):
        other = text.replace("# --- hyperparameters ---\n", dynamic + "# --- hyperparameters ---\n", 1)
        assert static_truth(other, conds) == {}
        assert "DEPTH" not in SourceValues().values(other)  # undecided without a probe: left out, never guessed
    assert static_truth(LIAR, conds) == {}
    # the values never come from what the trainer says it ran
    assert "hyperparams" in LIAR and SourceValues().values(LIAR).get("MATRIX_LR") == 0.04


def test_a_results_file_from_before_still_reads(tmp_path):
    """Rows written before the gauge columns (and before the loop read the hyperparameters itself) read as
    they were, with no speed; a run folder's old record ("summary") still gives the report its claims."""
    from reporting.summary import Source, row_from_run, run_summary

    cols = R.COLUMNS[: R.COLUMNS.index("worker") + 1]
    path = tmp_path / "results.tsv"
    row = R.Row("abc1234", 2.0, 0.5, "keep", "baseline", backend="cpu", device="fake cpu", num_steps=10,
                training_seconds=1.0, hyperparams={"DEPTH": 2}, run=1)
    line = "\t".join(R._format(c, getattr(row, c)) for c in cols)
    path.write_text("\t".join(cols) + "\n" + line + "\n")
    (back,) = R.read_results(path)
    assert back.hyperparams == {"DEPTH": 2} and back.num_steps == 10 and back.gauge_before_s is None
    assert speed(back) is None
    R.ensure_results_file(path)  # widened in place, the row kept
    header = path.read_text().split("\n")[0]
    assert R.read_results(path)[0].device == "fake cpu" and header.endswith("gauge_after_s\tkind\treason\tothers_cpu")
    runs = tmp_path / "runs" / "1"
    runs.mkdir(parents=True)
    claims = {"num_steps": 10, "device": "old", "hyperparams": {"A": 1}}
    (runs / "result.json").write_text(json.dumps({"eval": {"val_bpb": 2.0, "protocol": "tiny"}, "summary": claims}))
    old = row_from_run(runs)
    assert old.device == "old" and old.num_steps == 10 and old.hyperparams == {"A": 1}
    src = Source(path=tmp_path, rows=[back], runs_dir=tmp_path / "runs")
    assert run_summary(src, back)["num_steps"] == 10
    (runs / "result.json").write_text(json.dumps({"eval": {"val_bpb": 2.0}, "loop": {"device": "cpu", "hyperparams":
                                                  {"A": 2}}, "claims": {"num_steps": 5, "device": "H100"}}))
    new = row_from_run(runs)
    assert new.device == "cpu" and new.hyperparams == {"A": 2} and new.num_steps == 5
    assert run_summary(src, back) == {"num_steps": 5, "device": "H100"}

