"""The teacher's pseudo-labels: the records, the predict stage and its writer, selection (filter and balance) and its report."""
