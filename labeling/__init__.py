"""The labeling bridge: a Label Studio queue ordered by informativeness, labels back to the hub exactly once.

How it fits together (``flywheel label sync --watch`` runs one :class:`~labeling.bridge.Bridge` turn after
another):

- :mod:`labeling.push` asks the hub for a selection (as many cases as the throttle allows: the queue is
  held near the depth annotators get through in ``--horizon`` seconds) and imports them in batches;
  each task's image is the hub's signed URL and the model's prediction is a pre-annotation with a
  ``score`` and a ``cluster``; the project uses Label Studio's uncertainty sampling. The score is the
  queue's order, round-robin over the diversity clusters (``labeling.push.queue_scores``), because the bulk
  import drops ``cluster``; the cluster field is set afterwards, a time budget per turn. Every prediction
  carries the bridge's queue version (``labeling.bridge.QUEUE_VERSION``), never a model's: Label Studio
  serves and pre-annotates only the project's version, so one version keeps one queue across retrains
  and canaries (the model behind each prediction is the task's ``model_version`` data field).
- :mod:`labeling.pull` applies Label Studio's webhooks (drained from the hub's inbox) and a periodic
  reconciliation of the whole project to the ledger (:mod:`labeling.ledger`), then posts each
  annotation's answer as it is (the hub decides its status, :mod:`fleet.consensus`); deletions and skips are
  applied, and skipped or deleted tasks return their case to the hub's pool.
- :mod:`labeling.studio` is the only module that talks to Label Studio (through ``label_studio_sdk``);
  :mod:`labeling.hub_client` the only one that talks to the hub.
- :mod:`labeling.bots` are simulated annotators working the real queue, for the demo and benchmarks.

Label Studio itself runs beside the hub, in its own virtualenv (``scripts/services.sh`` shows how:
``label-studio start`` with legacy API tokens enabled and, for a hub on loopback, SSRF protection off).
The hub's image links must carry ``Access-Control-Allow-Origin`` (Label Studio's UI loads them
cross-origin).
"""
