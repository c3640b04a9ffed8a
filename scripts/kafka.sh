#!/usr/bin/env bash
# Starts a real Apache Kafka broker for the test suite: a single KRaft node (broker
# and controller) in a directory of its own, from Kafka's jars on Maven Central.
#
#   scripts/kafka.sh <dir>
#
# Resolves the jars once (scripts/kafka/pom.xml, Kafka pinned there) into
# ${XDG_CACHE_HOME:-~/.cache}/dwh-helper/kafka-<version>/libs, makes a CA and a server
# certificate for 127.0.0.1 with openssl, formats <dir>/data with SCRAM users, starts
# the broker in the background and waits until it answers on every listener. It then
# writes <dir>/env, the variables the tests read:
#   DWH_TEST_KAFKA_BOOTSTRAP        PLAINTEXT listener (authenticates as User:ANONYMOUS, a super user)
#   DWH_TEST_KAFKA_SASL_BOOTSTRAP   SASL_PLAINTEXT listener (SCRAM-SHA-512 and PLAIN)
#   DWH_TEST_KAFKA_SSL_BOOTSTRAP    SASL_SSL listener (the same mechanisms, the test CA)
#   DWH_TEST_KAFKA_CA               the CA certificate (PEM)
#   DWH_TEST_KAFKA_USER / _PASSWORD a user with no permission of its own: tests grant it ACLs
#   DWH_TEST_KAFKA_CLASSPATH        Kafka's jars, for its command-line tools (kafka-acls)
#   DWH_TEST_KAFKA_PID / _LOG       the broker's process and log
# and prints the broker's pid. StandardAuthorizer guards the SASL listeners; the
# PLAINTEXT listener is for the suite's own set-up and for the tests that do not
# test security.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:?usage: scripts/kafka.sh <dir>}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

kafka_version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/kafka/pom.xml")
cache="${XDG_CACHE_HOME:-$HOME/.cache}/dwh-helper/kafka-$kafka_version"
libs="$cache/libs"
if [ ! -f "$cache/complete" ]; then
  echo "scripts/kafka.sh: resolving Apache Kafka $kafka_version from Maven Central into $cache" >&2
  rm -rf "$cache"
  mkdir -p "$cache"
  mvn -q -B -f "$here/kafka/pom.xml" \
    org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$libs" >"$cache/mvn.log" 2>&1 \
    || { cat "$cache/mvn.log" >&2; exit 1; }
  [ -f "$libs/kafka_2.13-$kafka_version.jar" ] || { echo "scripts/kafka.sh: kafka_2.13-$kafka_version.jar missing after resolving" >&2; exit 1; }
  touch "$cache/complete"
fi
classpath="$libs/*"
java_bin="${JAVA_HOME:+$JAVA_HOME/bin/}java"
java_major=$("$java_bin" -XshowSettings:properties -version 2>&1 | sed -n 's/ *java.specification.version = //p')
if [ "${java_major%%.*}" -lt 17 ] 2>/dev/null; then
  echo "scripts/kafka.sh: Kafka $kafka_version needs Java 17 or newer, found $java_major" >&2
  exit 1
fi

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
plain_port=$(free_port)
sasl_port=$(free_port)
ssl_port=$(free_port)
controller_port=$(free_port)

# The test CA and the server's certificate (SAN 127.0.0.1 and localhost), as a
# PKCS12 keystore; the CA's PEM is what clients trust.
tls="$dir/tls"
mkdir -p "$tls"
store_password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=dwh-helper test CA" \
  -keyout "$tls/ca.key" -out "$tls/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$tls/server.ext"
openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial \
  -days 2 -extfile "$tls/server.ext" -out "$tls/server.pem" 2>/dev/null
openssl pkcs12 -export -in "$tls/server.pem" -inkey "$tls/server.key" -certfile "$tls/ca.pem" \
  -name server -passout "pass:$store_password" -out "$tls/server.p12"

admin_password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
user=dwh
user_password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
plain_users="user_admin=\"$admin_password\" user_$user=\"$user_password\""

cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:$plain_port,SASL_PLAINTEXT://127.0.0.1:$sasl_port,SASL_SSL://127.0.0.1:$ssl_port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$plain_port,SASL_PLAINTEXT://127.0.0.1:$sasl_port,SASL_SSL://127.0.0.1:$ssl_port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data

sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-512
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required $plain_users;
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required $plain_users;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location=$tls/server.p12
ssl.keystore.password=$store_password
ssl.key.password=$store_password
ssl.client.auth=none

# ACLs on the SASL listeners; PLAINTEXT traffic is User:ANONYMOUS, a super user
# (the controller's own traffic goes that way too).
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:ANONYMOUS;User:admin
allow.everyone.if.no.acl.found=false

# One node: internal topics of one replica, and no waiting for other members.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.partitions=4
# Crash tests lower the session timeouts: let them (classic and KIP-848 groups).
group.min.session.timeout.ms=1000
group.consumer.min.session.timeout.ms=3000
group.consumer.session.timeout.ms=6000
group.consumer.min.heartbeat.interval.ms=500
group.consumer.heartbeat.interval.ms=1000
# Small sparse index files: tests create thousands of partitions.
log.index.size.max.bytes=1048576
log.segment.bytes=67108864
EOF

cat >"$dir/log4j2.properties" <<EOF
status = error
appender.file.type = File
appender.file.name = file
appender.file.fileName = $dir/broker.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.server.name = org.apache.kafka.server
logger.server.level = INFO
EOF

java_opts=(-Xms256m -Xmx768m -XX:+UseG1GC -Djava.awt.headless=true
  "-Dlog4j2.configurationFile=$dir/log4j2.properties")
cluster_id=$("$java_bin" "${java_opts[@]}" -cp "$classpath" kafka.tools.StorageTool random-uuid)
"$java_bin" "${java_opts[@]}" -cp "$classpath" kafka.tools.StorageTool format \
  -t "$cluster_id" -c "$dir/server.properties" \
  --add-scram "SCRAM-SHA-512=[name=admin,password=$admin_password]" \
  --add-scram "SCRAM-SHA-512=[name=$user,password=$user_password]" >"$dir/format.log" 2>&1 \
  || { cat "$dir/format.log" >&2; exit 1; }

nohup "$java_bin" "${java_opts[@]}" -cp "$classpath" kafka.Kafka "$dir/server.properties" \
  >"$dir/stdout.log" 2>&1 &
pid=$!

# Ready when every listener accepts connections and the broker has registered
# (its log says so); a broker that exits early fails the start with its log.
ready=""
for _ in $(seq 1 600); do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "scripts/kafka.sh: the broker exited during its start" >&2
    tail -n 40 "$dir/stdout.log" "$dir/broker.log" >&2 2>/dev/null || true
    exit 1
  fi
  if grep -q "Kafka Server started" "$dir/broker.log" "$dir/stdout.log" 2>/dev/null \
    && python3 - "$plain_port" "$sasl_port" "$ssl_port" <<'PY' 2>/dev/null
import socket, sys
for port in sys.argv[1:]:
    socket.create_connection(("127.0.0.1", int(port)), 0.2).close()
PY
  then
    ready=1
    break
  fi
  sleep 0.1
done
if [ -z "$ready" ]; then
  echo "scripts/kafka.sh: the broker did not start within 60 s" >&2
  kill "$pid" 2>/dev/null || true
  tail -n 40 "$dir/broker.log" >&2 2>/dev/null || true
  exit 1
fi

cat >"$dir/env" <<EOF
export DWH_TEST_KAFKA_BOOTSTRAP=127.0.0.1:$plain_port
export DWH_TEST_KAFKA_SASL_BOOTSTRAP=127.0.0.1:$sasl_port
export DWH_TEST_KAFKA_SSL_BOOTSTRAP=127.0.0.1:$ssl_port
export DWH_TEST_KAFKA_CA=$tls/ca.pem
export DWH_TEST_KAFKA_USER=$user
export DWH_TEST_KAFKA_PASSWORD=$user_password
export DWH_TEST_KAFKA_ADMIN_PASSWORD=$admin_password
export DWH_TEST_KAFKA_CLASSPATH='$classpath'
export DWH_TEST_KAFKA_VERSION=$kafka_version
export DWH_TEST_KAFKA_PID=$pid
export DWH_TEST_KAFKA_LOG=$dir/broker.log
export DWH_TEST_KAFKA_DATA=$dir/data
EOF
echo "$pid"
