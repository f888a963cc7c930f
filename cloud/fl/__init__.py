"""Federated learning on the coordinator: SuperLink, node keys, runs, the closed loop.

`Federation` (in `fleet serve --fl`) supervises the SuperLink, registers the
node keys devices get at enrolment, chooses participants, submits runs of the
Flower App in `models.fl`, follows them, registers the result through the
pipeline and, when asked, puts it on a canary slice. No module here imports
`flwr`: Flower runs as its own processes.
"""
