"""``cbir evaluate``: labelled collections (:mod:`.datasets`), features and their
cache (:mod:`.features`), all-vs-all search and scoring (:mod:`.run`, metrics as
pure functions in :mod:`.metrics`), and the HTML report (:mod:`.report`)."""
