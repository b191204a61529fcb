"""``cbir serve``: the upload-and-search web page (static/) and its JSON API."""
