"""Support package of loop.py: results file, git and guard helpers, trainer runner, agents.

Locked: the research agent never edits it. Entry points: `research.session.Session`
(a repository opened for research), `research.experiment.run_experiment` (one experiment),
`research.driver.research` (the loop), `research.results.read_results` (the results file).
"""
