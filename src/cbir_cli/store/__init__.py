"""The feature store: ``.npy`` shards + rows + a manifest that is the single commit
point (:mod:`.feature_store`, layout in :mod:`.manifest`), written only through
:func:`.transaction.write_transaction`."""
