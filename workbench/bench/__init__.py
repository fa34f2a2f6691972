"""The GPU benchmark behind `workbench bench`: kernel checks and microbenchmarks (`micro`), end-to-end
transformer forwards (`e2e`) and the page that joins them (`page`)."""
