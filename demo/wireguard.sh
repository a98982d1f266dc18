#!/usr/bin/env bash
# The main job: two network namespaces joined by a veth pair, a userspace WireGuard in each,
# configured with the seed's `wg set` commands, a ping across, a few seconds of iperf3, `wg show`,
# then everything removed. `demo/wireguard.sh wireguard-go` runs wireguard-go on the right side.
# Nothing here touches the host's own interfaces, addresses or routes.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
WIRETUN_WG="$here/.venv/bin/wiretun-wg"
RIGHT_IMPL=${1:-wiretun-wg}
case "$RIGHT_IMPL" in
  wiretun-wg) RIGHT_CMD="$WIRETUN_WG" ;;
  wireguard-go) RIGHT_CMD="$(command -v wireguard-go)" ;;
  *) echo "usage: $0 [wiretun-wg|wireguard-go]" >&2; exit 2 ;;
esac
SECONDS_IPERF=${IPERF_SECONDS:-3}
id=$$
left="wtdemo-l-$id"; right="wtdemo-r-$id"
work=$(mktemp -d /tmp/wiretun-demo.XXXXXX)

cleanup() {
  set +e
  for ns in "$left" "$right"; do
    if ip netns list | grep -qw "$ns"; then
      ip -n "$ns" link del wg0 2>/dev/null; ip -n "$ns" link del wg1 2>/dev/null  # daemons exit when their interface goes
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null; done
      sleep 0.3
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
      ip netns del "$ns"
    fi
  done
  rm -rf "$work"
  echo "# cleaned up: namespaces, daemons and keys removed"
}
trap cleanup EXIT

if [ -t 1 ]; then bold=$'\033[1m'; plain=$'\033[0m'; else bold=""; plain=""; fi
say() { printf '\n%s# %s%s\n' "$bold" "$*" "$plain"; }
in_left() { ip netns exec "$left" "$@"; }
in_right() { ip netns exec "$right" "$@"; }

say "two namespaces joined by a veth pair: $left (192.168.1.4) <-> $right (192.168.1.5)"
ip netns add "$left"; ip netns add "$right"
ip link add wtdemo-l type veth peer name wtdemo-r
ip link set wtdemo-l netns "$left"; ip link set wtdemo-r netns "$right"
in_left ip link set lo up; in_right ip link set lo up
in_left ip addr add 192.168.1.4/24 dev wtdemo-l; in_left ip link set wtdemo-l up
in_right ip addr add 192.168.1.5/24 dev wtdemo-r; in_right ip link set wtdemo-r up

say "keys (created 0600)"
(umask 077; wg genkey > "$work/left.key"; wg genkey > "$work/right.key")
left_pub=$(wg pubkey < "$work/left.key"); right_pub=$(wg pubkey < "$work/right.key")
echo "left  public key $left_pub"
echo "right public key $right_pub"

say "userspace WireGuard: wiretun-wg wg0 (left), $RIGHT_IMPL wg1 (right; UAPI sockets share /var/run/wireguard)"
in_left env LOG_LEVEL=error "$WIRETUN_WG" wg0
in_right env LOG_LEVEL=error "$RIGHT_CMD" wg1

say "the seed's commands, on each side"
cd "$work"
cp left.key private.key
echo "+ ip address add dev wg0 10.0.0.1/24"
in_left ip address add dev wg0 10.0.0.1/24
echo "+ wg set wg0 listen-port 51820 private-key ./private.key peer $right_pub allowed-ips 10.0.0.2/32 endpoint 192.168.1.5:51820"
in_left wg set wg0 listen-port 51820 private-key ./private.key peer "$right_pub" allowed-ips 10.0.0.2/32 endpoint 192.168.1.5:51820
echo "+ ip link set dev wg0 up"
in_left ip link set dev wg0 up
cp right.key private.key
in_right ip address add dev wg1 10.0.0.2/24
in_right wg set wg1 listen-port 51820 private-key ./private.key peer "$left_pub" allowed-ips 10.0.0.1/32 endpoint 192.168.1.4:51820
in_right ip link set dev wg1 up
rm -f private.key

say "ping across the tunnel: 10.0.0.1 -> 10.0.0.2"
in_left ping -c 3 -i 0.3 -W 2 10.0.0.2 | tail -n 2

say "iperf3 TCP through the tunnel for ${SECONDS_IPERF}s"
in_right iperf3 -s -1 -B 10.0.0.2 >/dev/null 2>&1 &
sleep 0.5
in_left iperf3 -c 10.0.0.2 -t "$SECONDS_IPERF" -f m | grep -E "sender|receiver"
wait || true

say "wg show (left: wiretun-wg)"
in_left wg show wg0
say "wg show (right: $RIGHT_IMPL)"
in_right wg show wg1
