"""`python -m runtime.cluster`: the server's A1111 API on a Ray Serve cluster, one Pipeline per replica.

Needs the `cluster` extra (`ray[serve]`; no torch). The HTTP side is the server's own app
(runtime.server: routes, validation, mapping, middleware), run as the Serve ingress; each replica of
the `Generator` deployment loads one Pipeline (one GPU, or N CPU threads) and runs validated jobs.
Modules: `settings` (what a deployment is made of), `model_check` (the model's hashes, checked at
replica start), `generator` (the replica), `backend` (the ingress side: Serve handle -> the
server's Backend), `app` (the Serve application and its builder for `serve run`/`serve deploy`),
`__main__` (command line). See docs/cluster.md.
"""
