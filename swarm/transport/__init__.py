"""Networking behind a small interface (`base.Transport`). `hivemind_dht` is the only module that imports hivemind."""
