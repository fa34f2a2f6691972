"""Saving and loading: run directories (`rundir`), the packed low-bit format (`packed`, written by
`export`), manifests (`manifest`: versions, hashes, classes from an allow-list) and video files (`video`)."""
