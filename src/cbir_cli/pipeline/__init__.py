"""The writer side: plan a sync by content hash (:mod:`.plan`), run it through an
:class:`~.executor.Executor` (:mod:`.local`: this machine), commit through the
store's write transaction (:mod:`.sync`)."""
