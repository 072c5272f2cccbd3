"""`python -m harness.report OUTPUT`: the report of a harness run folder (harness.report.runs)."""

from harness.report.runs import main

main()
