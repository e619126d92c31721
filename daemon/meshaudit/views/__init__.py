"""Read-only views of engine state: the live service graph (``graph``, served as ``/graph.json``),
its page (``page``, ``/graph``) and ``meshaudit report`` (``report``, built from the two)."""
