#!/bin/sh
# One user and one database per gpualloc service, each owning only its own.
set -eu
for svc in allocation resource_pool viewer; do
  var=$(echo "$svc" | tr '[:lower:]' '[:upper:]')_DB_PASSWORD
  eval "password=\${$var}"
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" <<SQL
CREATE USER $svc WITH PASSWORD '$password';
CREATE DATABASE gpualloc_$svc OWNER $svc;
REVOKE ALL ON DATABASE gpualloc_$svc FROM PUBLIC;
SQL
done
