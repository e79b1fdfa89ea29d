"""The report library: compare text-conditioning strategies (or any `group_by` rows) from the MLflow runs of a study.

The statistics are small pure functions of a runs DataFrame (one row per run, a row-label column, one column per
metric named by its MLflow key), so they can be checked on synthetic numbers. One module per concern, in the order
a report is made (`sorabench.commands.report` wires them):

- runs.py: MLflow run records as a DataFrame, the study's parent and children, row labels, protocol checks;
- stats.py: summaries and 95% CIs, ranking, Welch / exact Mann–Whitney with Holm, power, TOST, Pareto front;
- attributes.py: seen vs unseen composition, reference points, the binding task's tables;
- guidance.py: the guidance axis and each strategy at its own best scale;
- reading.py: the plain-text reading; analysis.py: all of the above for one study, as one `Analysis`;
- formatting.py: numbers and tables as text (the ranked table shared by report.md and the terminal);
- plots.py: the PNG figures; markdown.py: report.md, one function per section.
"""
