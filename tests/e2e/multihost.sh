#!/usr/bin/env bash
# A pipeline across HOSTS machines, each a network namespace on this machine: veth pairs on a
# bridge (10.99.0.0/24, only inside namespaces this test creates), its own hostname (UTS
# namespace), mpirun in a head namespace starting one orted per host through OpenMPI's rsh
# launcher, whose agent is `ip netns exec` instead of ssh, MPI over TCP between the namespaces.
#  1. verify gives the logits_hash of --pp 1 bit for bit;
#  2. one host's link is cut mid-run (link down: its packets are dropped): the stage after it
#     names it as stalled or unreachable within the watchdog's timeout, mpirun exits non-zero,
#     and nothing is left running in any namespace.
# Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN); without it the test says so and is skipped (77).
. "$(dirname "$0")/lib.sh"
bin=$(readlink -f "$1") data=$(readlink -f "$2") hosts=$3 cut=${4:-$(( $3 / 2 ))}
T=3  # --stage-timeout of the cut test
skip() { echo "SKIP: $*"; exit 77; }
command -v ip >/dev/null || skip "ip (iproute2) is not installed"
command -v unshare >/dev/null || skip "unshare (util-linux) is not installed"
P="sp$$-"  # namespace prefix: this run's own
dir=$(mktemp -d)
cleanup() {
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$P"); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  rm -rf "$dir"
}
trap cleanup EXIT
err=$(ip netns add "${P}sw" 2>&1) || skip "cannot create network namespaces (needs root with CAP_SYS_ADMIN): $err"
# The switch: a bridge in its own namespace; each host's eth0 is a veth whose peer is on it.
ip -n "${P}sw" link set lo up && ip -n "${P}sw" link add br0 type bridge && ip -n "${P}sw" link set br0 up ||
  fail "could not create the bridge"
addr_of() { [ "$1" = head ] && echo 10.99.0.100 || echo "10.99.0.$(( $1 + 1 ))"; }
for h in head $(seq 0 $(( hosts - 1 ))); do
  ns="${P}h$h"
  ip netns add "$ns" && ip -n "$ns" link set lo up &&
    ip -n "${P}sw" link add "p$h" type veth peer name eth0 netns "$ns" &&
    ip -n "${P}sw" link set "p$h" master br0 up &&
    ip -n "$ns" addr add "$(addr_of $h)/24" dev eth0 && ip -n "$ns" link set eth0 up ||
    fail "could not set up host $h"
  # A lost peer is noticed in seconds (as a cluster tuned for it would), not after TCP's default
  # 15 minutes of retransmissions; OpenMPI's own keepalives are set below.
  ip netns exec "$ns" sysctl -q -w net.ipv4.tcp_retries2=4 net.ipv4.tcp_keepalive_time=2 \
    net.ipv4.tcp_keepalive_intvl=1 net.ipv4.tcp_keepalive_probes=3 || fail "sysctl in $ns"
  [ "$h" = head ] || echo "h$h slots=1" >> "$dir/hostfile"
done
# mpirun's remote launcher: "agent HOST COMMAND..." runs COMMAND on HOST as ssh would (a shell
# command line), here in HOST's namespace with HOST as its hostname.
cat > "$dir/agent" <<EOA
#!/bin/sh
host=\$1; shift
exec ip netns exec "${P}\$host" unshare --uts sh -c "hostname \$host; \$*"
EOA
chmod +x "$dir/agent"
mpi=(ip netns exec "${P}hhead" mpirun --hostfile "$dir/hostfile" -np "$hosts"
     --mca plm_rsh_agent "$dir/agent" --mca pml ob1 --mca btl tcp,self
     --mca btl_tcp_if_include 10.99.0.0/24 --mca oob_tcp_if_include 10.99.0.0/24
     --mca oob_tcp_keepalive_time 2 --mca oob_tcp_keepalive_intvl 1 --mca oob_tcp_keepalive_probes 3)
ns_procs() { for ns in $(ip netns list | awk '{print $1}' | grep "^$P"); do ip netns pids "$ns"; done; }

# 1. Bit-identical logits across the hosts.
model=$data/small
v=(verify --device cpu --model "$model" --golden "$model/golden.safetensors" --threads 1)
want=$(hash_of "$("$bin" "${v[@]}")") || fail "pp 1"
t0=$(date +%s%N)
out=$(timeout 120 "${mpi[@]}" "$bin" "${v[@]}" 2>&1); rc=$?
[ $rc = 0 ] || fail "$hosts hosts: verify exited $rc: $out"
[ "$(hash_of "$out")" = "$want" ] || fail "$hosts hosts: $(hash_of "$out") differs from pp 1's $want"
hn=$(grep -c "loaded" <<<"$out")
[ "$hn" = "$hosts" ] || fail "$hosts hosts: $hn stages loaded: $out"
echo "ok: $hosts hosts (namespaces, MPI over TCP): $(hash_of "$out") = pp 1 ($(( ($(date +%s%N) - t0) / 1000000 )) ms)"

# 2. Cut host $cut's link mid-generation.
gen=(generate --device cpu --model "$data/configs/flash-mini" --load-format dummy --prompt-ids 3,4,5,6
     --prompt-ids 7,8 --max-tokens 3000 --ignore-eos --threads 1 --stage-timeout $T)
log=$dir/run.log
timeout 120 "${mpi[@]}" "$bin" "${gen[@]}" >"$log" 2>&1 &
launcher=$!
for i in $(seq 1 300); do [ "$(grep -c loaded "$log")" = "$hosts" ] && break; sleep 0.1; done
[ "$(grep -c loaded "$log")" = "$hosts" ] || fail "the stages did not load: $(cat "$log")"
sleep 1
ip -n "${P}sw" link set "p$cut" down || fail "could not cut host $cut"
t1=$(date +%s%N)
wait $launcher; rc=$?
t_mpirun=$(( ($(date +%s%N) - t1) / 1000000 ))
[ $rc != 0 ] && [ $rc != 124 ] || fail "link cut: mpirun exit $rc: $(cat "$log")"
named="stage $cut is stalled or unreachable"
grep -q "$named" "$log" || fail "link cut: stage $cut not named: $(cat "$log")"
grep "is stalled or unreachable" "$log" | grep -vq "$named" && fail "link cut: another stage blamed: $(cat "$log")"
for i in $(seq 1 300); do [ -z "$(ns_procs)" ] && break; sleep 0.1; done
t_all=$(( ($(date +%s%N) - t1) / 1000000 ))
[ -z "$(ns_procs)" ] || fail "link cut: processes left 30 s after the cut: $(ps -o pid,cmd -p "$(ns_procs | paste -sd,)")"
# The message is printed T s after the cut; mpirun and the cut host's processes (its rank ends
# itself; its orted when OpenMPI's keepalives give up) follow within seconds.
[ $t_mpirun -lt $(( (T + 15) * 1000 )) ] || fail "link cut: mpirun took $t_mpirun ms"
echo "ok: host $cut of $hosts cut mid-run: exit $rc, $(grep -o "stage [0-9]* (rank [0-9]*): no message from stage $cut for [0-9.]* s" "$log" | head -1); mpirun gone after $t_mpirun ms, every process in every namespace after $t_all ms"
