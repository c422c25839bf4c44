#!/usr/bin/env bash
# Tear the cluster down (all nodes). The shared storage (EFS or S3) is not touched: runs, checkpoints and the
# MLflow database stay there for the next cluster; delete the file system or bucket yourself to stop paying.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=cluster_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster_lib.sh"

need_ray
need_yaml
need_cloud_credentials
say "ray down -y $CLUSTER_YAML (terminates the head and every worker)"
ray down -y "$CLUSTER_YAML"
say "cluster down; shared storage kept"
