"""The judge: what scores a run stands apart from what is scored (locked).

- `judge.harness` — the evaluation process: loads the graph a trainer handed over, reads the
  validation and holdout splits itself, probes causality at secret rows, computes bits per byte.
- `sandbox.confine` — the OS sandbox every trainer run goes through (bubblewrap or Landlock on
  Linux, Seatbelt on macOS).

Nothing here imports agent-written code.
"""
