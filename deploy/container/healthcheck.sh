#!/bin/bash
# The container's HEALTHCHECK: GET /health on the admin API, healthy on "200". The slim
# image has no curl; bash's /dev/tcp is enough for one plain HTTP/1.1 request.
# The port follows PASSERELLE__ADMIN__BIND when it overrides the baked-in 0.0.0.0:8025.
set -euo pipefail
bind="${PASSERELLE__ADMIN__BIND:-0.0.0.0:8025}"
port="${bind##*:}"
exec 3<>"/dev/tcp/127.0.0.1/${port}"
printf 'GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&3
read -r -t 5 status_line <&3
case "${status_line}" in
  "HTTP/1."?" 200 "*) exit 0 ;;
  *) echo "passerelle /health answered: ${status_line}" >&2; exit 1 ;;
esac
