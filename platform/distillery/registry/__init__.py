"""The lineage registry: every stage's run record, the content hashes that join runs into a lineage
(a served model back to its corpus files and teachers), model versions and aliases, and an
append-only event log; an embedded SQLite store safe for several writing processes
(`store.py`), an optional MLflow mirror (`mlflow_mirror.py`) and the `distillery registry`
commands (`commands.py`). What a stage writes into it is built by `record.py`."""
