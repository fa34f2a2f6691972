"""The GPU benchmark behind `workbench bench`: kernel checks and microbenchmarks (`micro`), end-to-end
transformer forwards (`e2e`) and sampling loops (`loop`) against the peers (`peers`), each variant in its own
process (`isolate`), and the page that joins them (`page`)."""
