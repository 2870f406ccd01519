"""Where the pipeline runs: storage (local paths and S3), MLflow tracking, starting or joining Ray and checking
the cluster, owner leases, devices and precision, the CLI front of every entry point, and the console."""
