"""Consumers of the findings topic that act in AWS (SPEC §14 "Out"): ``detector export securityhub``
(findings into AWS Security Hub as ASFF) and ``detector respond`` (an inline deny policy that contains
stolen instance credentials). The pure parts (parsing, ASFF, policies) import nothing from AWS.
"""
