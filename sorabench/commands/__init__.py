"""The CLI's commands, one thin module per command group: each composes nothing itself (cli.py has composed and
checked the config) and calls library code in training/, metrics/, sweep/ and report/."""
