"""The method and the machinery every task shares, task-agnostic: the SiD/SFD losses (:mod:`.losses`), the train
states and EMA rule (:mod:`.state`), the one host loop (:mod:`.loop`), the metric log (:mod:`.metrics_log`) and the
workdir rules (:mod:`.run_dir`, :mod:`.workdir_lock`)."""
