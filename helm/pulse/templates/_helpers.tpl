{{/*
Names, labels and the component table shared by every template.
*/}}

{{- define "pulse.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-prefixed name; components append "-<component>", so it stays under 40 characters. */}}
{{- define "pulse.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "pulse.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource. */}}
{{- define "pulse.labels" -}}
helm.sh/chart: {{ include "pulse.chart" . }}
app.kubernetes.io/name: {{ include "pulse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pulse
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of the release (every Pulse pod of it). */}}
{{- define "pulse.releaseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "pulse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of one component: call with (dict "root" $ "c" $component). */}}
{{- define "pulse.componentLabels" -}}
{{ include "pulse.labels" .root }}
app.kubernetes.io/component: {{ .c.name }}
{{- end -}}

{{- define "pulse.selectorLabels" -}}
{{ include "pulse.releaseSelectorLabels" .root }}
app.kubernetes.io/component: {{ .c.name }}
{{- end -}}

{{- define "pulse.componentName" -}}
{{- printf "%s-%s" (include "pulse.fullname" .root) .c.name -}}
{{- end -}}

{{- define "pulse.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
The fixed facts of each service: binary, arguments, ports, which shared settings it
reads (kafka, clickhouse, s3, windowing, registry) and which Secret keys. Values add
the rest (replicas, resources, …) under .Values.<key>. Every env name here is a real
setting of the binary (checked by tests/python/chart_runs.py against `--help`).
*/}}
{{- define "pulse.componentTable" -}}
ingest:
  key: ingest
  command: [pulse-ingest]
  args: []
  ports: {http: 8080, grpc: 50051, admin: 9101}
  addrEnv: {http: PULSE_INGEST_HTTP_ADDR, grpc: PULSE_INGEST_GRPC_ADDR}
  uses: [kafka, registry]
  consumer: false
  secrets: [ingest-api-keys, pii-hmac-key]
processor:
  key: processor
  command: [pulse-processor]
  args: []
  ports: {admin: 9102}
  addrEnv: {}
  uses: [kafka, registry, windowing]
  consumer: true
  topics: [pulse.events.v1]
  secrets: []
writer-clickhouse:
  key: writerClickhouse
  command: [pulse-writer]
  args: [--sink, clickhouse]
  ports: {admin: 9103}
  addrEnv: {}
  uses: [kafka, clickhouse]
  consumer: true
  topics: [pulse.events.v1, pulse.user-activity.v1, pulse.sessions.v1]
  secrets: [clickhouse-password]
writer-parquet:
  key: writerParquet
  command: [pulse-writer]
  args: [--sink, parquet]
  ports: {admin: 9106}
  addrEnv: {}
  uses: [kafka, clickhouse, s3]
  consumer: true
  topics: [pulse.events.v1, pulse.user-activity.v1, pulse.sessions.v1]
  secrets: [clickhouse-password, s3-access-key, s3-secret-key]
# The query API's Kafka use is its audit records (token file reloads) alone: it serves
# and stays ready while the brokers are down.
query-api:
  key: queryApi
  command: [pulse-query-api]
  args: []
  ports: {http: 8090, grpc: 50052, admin: 9104}
  addrEnv: {http: PULSE_QUERY_HTTP_ADDR, grpc: PULSE_QUERY_GRPC_ADDR}
  uses: [kafka, clickhouse, windowing]
  consumer: false
  secrets: [query-api-tokens, clickhouse-password]
schema-registry:
  key: schemaRegistry
  command: [pulse-schema-registry]
  args: []
  ports: {http: 8081, admin: 9105}
  addrEnv: {http: PULSE_SCHEMA_REGISTRY_ADDR}
  uses: [kafka]
  consumer: false
  secrets: []
# The event ledger: reads the topics (assigned partitions, no consumer group), ClickHouse,
# the archive and the query API; one process (`singleton`: Recreate, never scaled).
ledger:
  key: ledger
  command: [pulsectl]
  args: [ledger, watch]
  ports: {admin: 9107}
  addrEnv: {}
  uses: [kafka, clickhouse, s3, windowing]
  consumer: false
  singleton: true
  secrets: [ledger-query-token, clickhouse-password, s3-access-key, s3-secret-key]
{{- end -}}

{{/*
The enabled components as a list of dicts: the table's facts plus `name` and `values`
(the component's block of .Values). Call: include "pulse.components" $ | fromYaml.
*/}}
{{- define "pulse.components" -}}
{{- $out := list -}}
{{- $table := include "pulse.componentTable" . | fromYaml -}}
{{- range $name := list "schema-registry" "ingest" "processor" "writer-clickhouse" "writer-parquet" "query-api" "ledger" -}}
{{- $c := index $table $name -}}
{{- $v := index $.Values $c.key -}}
{{- if $v.enabled -}}
{{- $out = append $out (merge (dict "name" $name "values" $v "image" (include "pulse.image" $)) $c) -}}
{{- end -}}
{{- end -}}
{{- with include "pulse.shadowComponents" . | fromYaml -}}
{{- $out = concat $out .items -}}
{{- end -}}
{{- toYaml (dict "items" $out) -}}
{{- end -}}

{{/*
The shadow's components (shadow.enabled): `<live>-shadow` for the processor and the
ClickHouse writer. Each is its live component (the table's facts, its values) with
`--shadow <name>` added to the args, its own admin port (a pod of its own, but distinct
ports let both run on one host, as chart_runs.py does), its own image (shadow.image) and
the values of shadow.processor / shadow.writer over the live block's (config merged,
non-empty lists and resources replace). `shadow: true` keeps it out of the HPA, KEDA, PDB
and the live ServiceMonitors; `live` names the counterpart whose serverTls setting it
follows. Values that are not copied: autoscaling and pdb (off), the Service (ClusterIP,
no annotations).
*/}}
{{- define "pulse.shadowComponents" -}}
{{- $s := .Values.shadow -}}
{{- if $s.enabled -}}
{{- $table := include "pulse.componentTable" . | fromYaml -}}
{{- $image := include "pulse.image" . -}}
{{- if or $s.image.repository $s.image.tag -}}
{{- $image = printf "%s:%s" (default .Values.image.repository $s.image.repository) (default (default .Chart.AppVersion .Values.image.tag) $s.image.tag) -}}
{{- end -}}
{{- $out := list -}}
{{- range $spec := list (list "processor" "processor" 9112) (list "writer-clickhouse" "writer" 9113) -}}
{{- $live := index $spec 0 -}}
{{- $c := deepCopy (index $table $live) -}}
{{- $lv := index $.Values $c.key -}}
{{- if not $lv.enabled -}}
{{- fail (printf "shadow.enabled needs %s.enabled: the shadow runs beside the live %s" $c.key $live) -}}
{{- end -}}
{{- $sv := index $s (index $spec 1) -}}
{{- $v := deepCopy $lv -}}
{{- $_ := set $v "replicas" $sv.replicas -}}
{{- range $k := list "resources" "extraArgs" "extraEnv" -}}
{{- if index $sv $k -}}
{{- $_ := set $v $k (index $sv $k) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $v "config" (merge (deepCopy ($sv.config | default dict)) ($lv.config | default dict)) -}}
{{- $_ := set $v "autoscaling" (merge (dict "enabled" false) $lv.autoscaling) -}}
{{- $_ := set $v "pdb" (dict "enabled" false) -}}
{{- $_ := set $v "service" (dict "type" "ClusterIP" "annotations" dict) -}}
{{- $_ := set $c "args" (concat $c.args (list "--shadow" $s.name)) -}}
{{- $_ := set $c "ports" (dict "admin" (index $spec 2)) -}}
{{- $_ := set $c "key" (printf "shadow.%s" (index $spec 1)) -}}
{{- $name := printf "%s-shadow" $live -}}
{{- $full := printf "%s-%s" (include "pulse.fullname" $) $name -}}
{{- if gt (len $full) 63 -}}
{{- fail (printf "shadow.enabled: the Service name %s is %d characters, more than Kubernetes' 63; shorten the release name or set fullnameOverride (at most %d characters)" $full (len $full) (sub 62 (len $name))) -}}
{{- end -}}
{{- $out = append $out (merge (dict "name" $name "live" $live "shadow" true "values" $v "image" $image) $c) -}}
{{- end -}}
{{- toYaml (dict "items" $out) -}}
{{- end -}}
{{- end -}}

{{/* Secret name (chart-created or existing). */}}
{{- define "pulse.secretName" -}}
{{- default (printf "%s-secrets" (include "pulse.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{/*
How each Secret key reaches a binary: `env` is the variable holding the value, `fileEnv`
(when the binary can read the value from a file) the variable holding the file's path.
The optional keys stay env (secretKeyRef, optional): the binaries also read their *_FILE
forms, but a mounted file for a key the Secret does not hold would be refused at start.
*/}}
{{- define "pulse.secretKeys" -}}
ingest-api-keys: {env: PULSE_INGEST_API_KEYS, fileEnv: PULSE_INGEST_API_KEYS_FILE, optional: false}
pii-hmac-key: {env: PULSE_INGEST_PII_HMAC_KEY, fileEnv: PULSE_INGEST_PII_HMAC_KEY_FILE, optional: false}
query-api-tokens: {env: PULSE_QUERY_API_TOKENS, fileEnv: PULSE_QUERY_API_TOKENS_FILE, optional: false}
ledger-query-token: {env: PULSE_LEDGER_QUERY_TOKEN, fileEnv: PULSE_LEDGER_QUERY_TOKEN_FILE, optional: false}
clickhouse-password: {env: PULSE_CLICKHOUSE_PASSWORD, fileEnv: "", optional: true}
s3-access-key: {env: PULSE_S3_ACCESS_KEY, fileEnv: "", optional: true}
s3-secret-key: {env: PULSE_S3_SECRET_KEY, fileEnv: "", optional: true}
{{- end -}}

{{- define "pulse.secretMountPath" -}}/etc/pulse/secrets{{- end -}}

{{/*
A generated secret value, the same in every template of one render and kept across
upgrades: the value from the existing chart-created Secret when there is one (lookup;
empty under `helm template`), else a random one formatted with the optional third
argument (e.g. "%s=default"). Call with (list $ "secret-key") or (list $ "key" "format").
*/}}
{{- define "pulse.generated" -}}
{{- $root := index . 0 -}}
{{- $key := index . 1 -}}
{{- $memo := get $root "pulseGenerated" | default dict -}}
{{- if not (hasKey $memo $key) -}}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace (printf "%s-secrets" (include "pulse.fullname" $root)) -}}
{{- $value := "" -}}
{{- if and $existing (hasKey ($existing.data | default dict) $key) -}}
{{- $value = index $existing.data $key | b64dec -}}
{{- else -}}
{{- $format := "%s" -}}
{{- if gt (len .) 2 }}{{ $format = index . 2 }}{{ end -}}
{{- $value = printf $format (randAlphaNum 32) -}}
{{- end -}}
{{- $_ := set $memo $key $value -}}
{{- $_ := set $root "pulseGenerated" $memo -}}
{{- end -}}
{{- index $memo $key -}}
{{- end -}}

{{/*
"true" when the chart makes the schema registry's users itself: auth on, and neither
schemaRegistry.auth.users nor schemaRegistry.auth.existingSecret given. Call with $.
*/}}
{{- define "pulse.registryUsersGenerated" -}}
{{- $auth := .Values.schemaRegistry.auth -}}
{{- if and $auth.enabled (not $auth.users) (not $auth.existingSecret) }}true{{ end -}}
{{- end -}}

{{/*
The password of a registry client, (list $ "read") or (list $ "write"):
secrets.registryReadPassword / registryWritePassword when set, else a random one
(pulse.generated: kept across upgrades through the main Secret).
*/}}
{{- define "pulse.registryPassword" -}}
{{- $root := index . 0 -}}
{{- $role := index . 1 -}}
{{- $given := ternary $root.Values.secrets.registryWritePassword $root.Values.secrets.registryReadPassword (eq $role "write") -}}
{{- if $given -}}
{{- $given -}}
{{- else -}}
{{- include "pulse.generated" (list $root (printf "registry-%s-password" $role)) -}}
{{- end -}}
{{- end -}}

{{/*
The generated users file of the schema registry (pulse.registryUsersGenerated), as YAML
{users, fingerprints}: the lines `<readUser>:read:<bcrypt>` and `<writeUser>:write:<bcrypt>`,
made by Sprig's htpasswd (Go's bcrypt: `$2a$`, cost 10) from pulse.registryPassword.
bcrypt salts every hash, so hashing on every render would change the Secret on every
upgrade: a user's hash is taken over from the existing users Secret (lookup) when its
fingerprint, sha256 of "<hash>:<password>" kept in the same Secret (key `fingerprints`,
not mounted), says it was made for the current password; it is made anew on a first
install, a new password, a renamed user or an edited line. The fingerprints are as secret
as the passwords in the main Secret beside them. Call with $.
*/}}
{{- define "pulse.registryUsersFile" -}}
{{- $root := . -}}
{{- $auth := .Values.schemaRegistry.auth -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (printf "%s-registry-users" (include "pulse.fullname" .)) -}}
{{- $data := dict -}}
{{- if $existing }}{{ $data = $existing.data | default dict }}{{ end -}}
{{- $oldLines := splitList "\n" (index $data $auth.usersKey | default "" | b64dec) -}}
{{- $oldPrints := splitList "\n" (index $data "fingerprints" | default "" | b64dec) -}}
{{- $lines := list -}}
{{- $prints := list -}}
{{- range $role := list "read" "write" -}}
{{- $user := ternary $auth.writeUser $auth.readUser (eq $role "write") -}}
{{- $password := include "pulse.registryPassword" (list $root $role) -}}
{{- if gt (len $password) 72 -}}
{{- fail (printf "secrets.registry%sPassword is %d bytes: at most 72 (bcrypt reads no more)" (title $role) (len $password)) -}}
{{- end -}}
{{- $prefix := printf "%s:%s:" $user $role -}}
{{- $hash := "" -}}
{{- range $oldLines -}}
{{- if hasPrefix $prefix . }}{{ $hash = trimPrefix $prefix . | trim }}{{ end -}}
{{- end -}}
{{- if not (and $hash (has (printf "%s:%s" $user (sha256sum (printf "%s:%s" $hash $password))) $oldPrints)) -}}
{{- $hash = htpasswd $user $password | trimPrefix (printf "%s:" $user) -}}
{{- end -}}
{{- if not (regexMatch "^\\$2[aby]\\$[0-9]{2}\\$[./A-Za-z0-9]{53}$" $hash) -}}
{{- fail (printf "schemaRegistry.auth: htpasswd made no bcrypt hash for user %q (a name with ':'?)" $user) -}}
{{- end -}}
{{- $lines = append $lines (printf "%s%s" $prefix $hash) -}}
{{- $prints = append $prints (printf "%s:%s" $user (sha256sum (printf "%s:%s" $hash $password))) -}}
{{- end -}}
users: {{ printf "%s\n" (join "\n" $lines) | quote }}
fingerprints: {{ printf "%s\n" (join "\n" $prints) | quote }}
{{- end -}}

{{/* The librdkafka options string (PULSE_KAFKA_OPTIONS): values, SASL, TLS CA. */}}
{{- define "pulse.kafkaOptions" -}}
{{- $opts := list -}}
{{- range $k, $v := .Values.kafka.options -}}
{{- $opts = append $opts (printf "%s=%v" $k $v) -}}
{{- end -}}
{{- if .Values.kafka.sasl.enabled -}}
{{- $opts = append $opts (printf "sasl.mechanism=%s" .Values.kafka.sasl.mechanism) -}}
{{- $opts = append $opts (printf "sasl.username=%s" .Values.kafka.sasl.username) -}}
{{- end -}}
{{- if .Values.kafka.tls.caSecret -}}
{{- $opts = append $opts (printf "ssl.ca.location=/etc/pulse/kafka-ca/%s" .Values.kafka.tls.caKey) -}}
{{- end -}}
{{- join "," $opts -}}
{{- end -}}

{{/*
Env shared by every container that talks to Kafka: the SASL password (PULSE_KAFKA_SASL_PASSWORD,
read by the binaries from env only; they refuse sasl.password in PULSE_KAFKA_OPTIONS) and
the options; the password never appears in args or a ConfigMap.
*/}}
{{- define "pulse.kafkaEnv" -}}
{{- if .Values.kafka.sasl.enabled }}
- name: PULSE_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "pulse.secretName" . }}
      key: kafka-sasl-password
{{- end }}
{{- $opts := include "pulse.kafkaOptions" . }}
{{- if $opts }}
- name: PULSE_KAFKA_OPTIONS
  value: {{ $opts | quote }}
{{- end }}
{{- end -}}

{{- define "pulse.kafkaVolumeMounts" -}}
{{- if .Values.kafka.tls.caSecret }}
- name: kafka-ca
  mountPath: /etc/pulse/kafka-ca
  readOnly: true
{{- end }}
{{- end -}}

{{- define "pulse.kafkaVolumes" -}}
{{- if .Values.kafka.tls.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ .Values.kafka.tls.caSecret }}
    items:
      - key: {{ .Values.kafka.tls.caKey }}
        path: {{ .Values.kafka.tls.caKey }}
{{- end }}
{{- end -}}

{{/* The ClickHouse password env (for containers that use ClickHouse). */}}
{{- define "pulse.clickhousePasswordEnv" -}}
- name: PULSE_CLICKHOUSE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "pulse.secretName" . }}
      key: clickhouse-password
      optional: true
{{- end -}}

{{/* Service URL of a component inside the cluster: (list $ "component" "port-name"). */}}
{{- define "pulse.serviceURL" -}}
{{- $root := index . 0 -}}
{{- $table := include "pulse.componentTable" $root | fromYaml -}}
{{- $c := index $table (index . 1) -}}
{{- printf "http://%s-%s.%s.svc:%v" (include "pulse.fullname" $root) (index . 1) $root.Release.Namespace (index $c.ports (index . 2)) -}}
{{- end -}}

{{/* maxReplicas of a component: its value, or kafka.partitions for consumers when 0. */}}
{{- define "pulse.maxReplicas" -}}
{{- $max := int .c.values.autoscaling.maxReplicas -}}
{{- if and .c.consumer (eq $max 0) -}}
{{- $max = int .root.Values.kafka.partitions -}}
{{- end -}}
{{- $max -}}
{{- end -}}

{{/* Pod annotations: config and secret checksums roll the pods when a setting changes. */}}
{{- define "pulse.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end -}}

{{/*
The env list of a service container (no leading newline; empty when there is none):
Kafka options and SASL password, Secret values (as env, or as the path of the mounted
file when the binary reads files), extraEnv. Call with (dict "root" $ "c" $c "fileKeys" list).
*/}}
{{- define "pulse.containerEnv" -}}
{{- $root := .root -}}
{{- $secretTable := include "pulse.secretKeys" $root | fromYaml -}}
{{- $out := list -}}
{{- if has "kafka" .c.uses -}}
{{- with include "pulse.kafkaEnv" $root | fromYamlArray -}}
{{- $out = concat $out . -}}
{{- end -}}
{{- end -}}
{{- range $key := .c.secrets -}}
{{- $s := index $secretTable $key -}}
{{- if has $key $.fileKeys -}}
{{- $out = append $out (dict "name" $s.fileEnv "value" (printf "%s/%s" (include "pulse.secretMountPath" $root) $key)) -}}
{{- else -}}
{{- $out = append $out (dict "name" $s.env "valueFrom" (dict "secretKeyRef" (dict "name" (include "pulse.secretName" $root) "key" $key "optional" $s.optional))) -}}
{{- end -}}
{{- end -}}
{{- with .c.values.extraEnv -}}
{{- $out = concat $out . -}}
{{- end -}}
{{- if $out -}}
{{- toYaml $out -}}
{{- end -}}
{{- end -}}

{{/* Non-secret settings per concern, as a YAML map (ConfigMaps and the hook Jobs use them). */}}
{{- define "pulse.settings.telemetry" -}}
PULSE_LOG_FORMAT: {{ .Values.telemetry.logFormat | quote }}
PULSE_LOG: {{ .Values.telemetry.logLevel | quote }}
PULSE_TRACE_SAMPLE_RATIO: {{ .Values.telemetry.traceSampleRatio | toString | quote }}
{{- with .Values.telemetry.otlpEndpoint }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "pulse.settings.kafka" -}}
PULSE_KAFKA_BROKERS: {{ required "kafka.brokers is required" .Values.kafka.brokers | quote }}
PULSE_KAFKA_PARTITIONS: {{ .Values.kafka.partitions | toString | quote }}
PULSE_KAFKA_REPLICATION_FACTOR: {{ .Values.kafka.replicationFactor | toString | quote }}
PULSE_KAFKA_MIN_INSYNC_REPLICAS: {{ .Values.kafka.minInsyncReplicas | toString | quote }}
PULSE_KAFKA_EVENTS_RETENTION: {{ .Values.kafka.retention.events | quote }}
PULSE_KAFKA_DLQ_RETENTION: {{ .Values.kafka.retention.dlq | quote }}
PULSE_KAFKA_LATE_RETENTION: {{ .Values.kafka.retention.late | quote }}
PULSE_KAFKA_AGGREGATES_RETENTION: {{ .Values.kafka.retention.aggregates | quote }}
PULSE_KAFKA_PRODUCER_STALL_TIMEOUT: {{ .Values.kafka.producer.stallTimeout | quote }}
PULSE_KAFKA_PRODUCER_LIVENESS_TIMEOUT: {{ .Values.kafka.producer.livenessTimeout | quote }}
PULSE_KAFKA_COMPRESSION: {{ .Values.kafka.compression | quote }}
{{- end -}}

{{- define "pulse.settings.clickhouse" -}}
PULSE_CLICKHOUSE_URL: {{ required "clickhouse.url is required" .Values.clickhouse.url | quote }}
PULSE_CLICKHOUSE_DATABASE: {{ .Values.clickhouse.database | quote }}
PULSE_CLICKHOUSE_USER: {{ .Values.clickhouse.user | quote }}
PULSE_CLICKHOUSE_COMPRESSION: {{ .Values.clickhouse.compression | quote }}
PULSE_CLICKHOUSE_VALIDATION: {{ .Values.clickhouse.validation | toString | quote }}
{{- if .Values.clickhouse.caSecret }}
PULSE_CLICKHOUSE_CA_FILE: {{ printf "/etc/pulse/clickhouse-ca/%s" .Values.clickhouse.caKey | quote }}
{{- end }}
{{- end -}}

{{- define "pulse.settings.s3" -}}
PULSE_S3_ENDPOINT: {{ .Values.s3.endpoint | quote }}
PULSE_S3_BUCKET: {{ .Values.s3.bucket | quote }}
PULSE_S3_PREFIX: {{ .Values.s3.prefix | quote }}
PULSE_S3_REGION: {{ .Values.s3.region | quote }}
PULSE_S3_PATH_STYLE: {{ .Values.s3.pathStyle | toString | quote }}
{{- with .Values.s3.sse }}
PULSE_S3_SSE: {{ . | quote }}
{{- end }}
{{- with .Values.s3.sseKmsKeyId }}
PULSE_S3_SSE_KMS_KEY_ID: {{ . | quote }}
{{- end }}
{{- end -}}

{{/*
Files mounted from Secrets (never with subPath, so an edited Secret reaches the running
pod): the ClickHouse CA (containers using ClickHouse), the registry's users file (the
registry), a registry client's password and, when the registry serves TLS, the CA it
trusts (ingest, processor, the schemas Job). Each
takes (dict "root" $ "c" component); the Jobs pass a c of their own (`uses`, `name`).
*/}}
{{- define "pulse.fileVolumeMounts" -}}
{{- $auth := .root.Values.schemaRegistry.auth -}}
{{- if and (has "clickhouse" .c.uses) .root.Values.clickhouse.caSecret }}
- name: clickhouse-ca
  mountPath: /etc/pulse/clickhouse-ca
  readOnly: true
{{- end }}
{{- if and $auth.enabled (eq .c.name "schema-registry") }}
- name: registry-users
  mountPath: /etc/pulse/registry-auth
  readOnly: true
{{- end }}
{{- if and $auth.enabled (has "registry" .c.uses) }}
- name: registry-client
  mountPath: /etc/pulse/registry-client
  readOnly: true
{{- end }}
{{- if and (has "registry" .c.uses) (include "pulse.registryTlsOn" .root) }}
- name: registry-ca
  mountPath: /etc/pulse/registry-ca
  readOnly: true
{{- end }}
{{- if eq .c.name "ledger" }}
{{- $qtls := include "pulse.ledgerQueryTls" .root }}
{{- if or (eq $qtls "ca") (eq $qtls "mtls") }}
- name: query-api-ca
  mountPath: /etc/pulse/query-api-ca
  readOnly: true
{{- end }}
{{- if eq $qtls "mtls" }}
- name: query-api-client
  mountPath: /etc/pulse/query-api-client
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{- define "pulse.fileVolumes" -}}
{{- $auth := .root.Values.schemaRegistry.auth -}}
{{- if and (has "clickhouse" .c.uses) .root.Values.clickhouse.caSecret }}
- name: clickhouse-ca
  secret:
    secretName: {{ .root.Values.clickhouse.caSecret }}
    items:
      - key: {{ .root.Values.clickhouse.caKey }}
        path: {{ .root.Values.clickhouse.caKey }}
{{- end }}
{{- if and $auth.enabled (eq .c.name "schema-registry") }}
- name: registry-users
  secret:
    secretName: {{ default (printf "%s-registry-users" (include "pulse.fullname" .root)) $auth.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $auth.usersKey }}
        path: users
{{- end }}
{{- if and $auth.enabled (has "registry" .c.uses) }}
- name: registry-client
  secret:
    secretName: {{ include "pulse.secretName" .root }}
    defaultMode: 0440
    items:
      - key: {{ ternary "registry-write-password" "registry-read-password" (eq .c.name "schemas") }}
        path: password
{{- end }}
{{- if and (has "registry" .c.uses) (include "pulse.registryTlsOn" .root) }}
{{- $t := .root.Values.serverTls }}
- name: registry-ca
  secret:
    secretName: {{ default (required "serverTls.secret is required when serverTls.enabled is true" $t.secret) $t.caSecret }}
    items:
      - key: {{ $t.caKey }}
        path: {{ $t.caKey }}
{{- end }}
{{- if eq .c.name "ledger" }}
{{- $qtls := include "pulse.ledgerQueryTls" .root }}
{{- $t := .root.Values.serverTls }}
{{- if or (eq $qtls "ca") (eq $qtls "mtls") }}
- name: query-api-ca
  secret:
    secretName: {{ default (required "serverTls.secret is required when serverTls.enabled is true" $t.secret) $t.caSecret }}
    items:
      - key: {{ $t.caKey }}
        path: {{ $t.caKey }}
{{- end }}
{{- if eq $qtls "mtls" }}
- name: query-api-client
  secret:
    secretName: {{ .root.Values.ledger.queryClientTlsSecret }}
    defaultMode: 0440
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end }}
{{- end -}}

{{/* How the ledger reaches this release's query API when that serves TLS (`query-api` in
serverTls.components): "" (plain HTTP, or no query API), "ca" (https, trusting serverTls'
CA), "mtls" (also presenting ledger.queryClientTlsSecret, as serverTls.clientCaSecret
requires) or "skip" (mutual TLS without a client certificate for the ledger: it skips its
revenue check). */}}
{{- define "pulse.ledgerQueryTls" -}}
{{- $t := .Values.serverTls -}}
{{- if and .Values.queryApi.enabled $t.enabled (has "query-api" $t.components) -}}
{{- if not $t.clientCaSecret -}}ca{{- else if .Values.ledger.queryClientTlsSecret -}}mtls{{- else -}}skip{{- end -}}
{{- end -}}
{{- end -}}

{{/* Registry auth settings of a component (ConfigMap / Job env map), and the CA a registry
client trusts when the registry serves TLS: (dict "root" $ "c" c). */}}
{{- define "pulse.settings.registryAuth" -}}
{{- $auth := .root.Values.schemaRegistry.auth -}}
{{- if and (has "registry" .c.uses) (include "pulse.registryTlsOn" .root) }}
PULSE_SCHEMA_REGISTRY_CA_FILE: {{ printf "/etc/pulse/registry-ca/%s" .root.Values.serverTls.caKey }}
{{- end }}
{{- if $auth.enabled }}
{{- if eq .c.name "schema-registry" }}
PULSE_REGISTRY_AUTH_FILE: /etc/pulse/registry-auth/users
{{- end }}
{{- if has "registry" .c.uses }}
PULSE_REGISTRY_USERNAME: {{ ternary $auth.writeUser $auth.readUser (eq .c.name "schemas") | quote }}
PULSE_REGISTRY_PASSWORD_FILE: /etc/pulse/registry-client/password
{{- end }}
{{- end }}
{{- end -}}

{{- define "pulse.settings.windowing" -}}
PULSE_WINDOW_MS: {{ .Values.windowing.windowMs | int64 | toString | quote }}
PULSE_ALLOWED_LATENESS_MS: {{ .Values.windowing.allowedLatenessMs | int64 | toString | quote }}
{{- end -}}

{{/* A settings map as an env list: (list $ "kafka" "clickhouse"). */}}
{{- define "pulse.settingsEnv" -}}
{{- $root := index . 0 -}}
{{- range $concern := rest . }}
{{- range $k, $v := include (printf "pulse.settings.%s" $concern) $root | fromYaml }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by the Jobs and the test Pod. */}}
{{- define "pulse.jobPodSpec" -}}
restartPolicy: Never
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{/* A pulsectl container: (dict "root" $ "name" "x" "args" list "env" yaml-string), optional
"mounts" (yaml-string) and "image" (default: the chart's). */}}
{{- define "pulse.pulsectlContainer" -}}
- name: {{ .name }}
  image: {{ default (include "pulse.image" .root) .image | quote }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command: [pulsectl]
  args:
    {{- toYaml .args | nindent 4 }}
  {{- with .env }}
  env:
    {{- . | nindent 4 }}
  {{- end }}
  {{- with .mounts }}
  volumeMounts:
    {{- . | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml .root.Values.hooks.resources | nindent 4 }}
  securityContext:
    {{- toYaml .root.Values.securityContext | nindent 4 }}
{{- end -}}

{{/* The schema Job's pod template: (dict "root" $ "env" yaml-string). */}}
{{- define "pulse.schemasPod" -}}
metadata:
  labels:
    {{- include "pulse.labels" .root | nindent 4 }}
    app.kubernetes.io/component: schemas
spec:
  {{- include "pulse.jobPodSpec" .root | nindent 2 }}
  containers:
    {{- include "pulse.pulsectlContainer" (dict "root" .root "name" "schemas" "args" (list "schemas" "register") "env" .env "mounts" (include "pulse.fileVolumeMounts" .ctx | trim)) | nindent 4 }}
    {{- $s := .root.Values.shadow }}
    {{- if $s.enabled }}
    {{- /* The shadow's output subjects (`<topic>.shadow.<name>`), named after the live
    topics the processor is given; the shadow processor is ready only once they exist. */}}
    {{- $env := .env }}
    {{- range $k := list "PULSE_USER_ACTIVITY_TOPIC" "PULSE_SESSIONS_TOPIC" }}
    {{- with index ($.root.Values.processor.config | default dict) $k }}
    {{- $env = printf "%s\n- name: %s\n  value: %s" $env $k (toString . | quote) }}
    {{- end }}
    {{- end }}
    {{- /* pulsectl of the shadow's image: the schemas its processor produces with. */}}
    {{- $image := (index (include "pulse.shadowComponents" .root | fromYaml).items 0).image }}
    {{- include "pulse.pulsectlContainer" (dict "root" .root "name" "shadow-schemas" "image" $image "args" (list "shadow" "schemas" "--shadow" $s.name) "env" $env "mounts" (include "pulse.fileVolumeMounts" .ctx | trim)) | nindent 4 }}
    {{- end }}
  {{- with include "pulse.fileVolumes" .ctx | trim }}
  volumes:
    {{- . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/*
Server TLS of a component (dict "root" $ "c" component): "true" when `serverTls` is on and
lists it. Its settings (the files of the mounted Secrets) go into the component's
ConfigMap; the volumes are pulse.serverTlsVolumeMounts / pulse.serverTlsVolumes.
*/}}
{{- define "pulse.serverTlsOn" -}}
{{- $t := .root.Values.serverTls -}}
{{- if and $t.enabled (has (default .c.name .c.live) $t.components) }}true{{ end -}}
{{- end -}}

{{/* "true" for a component whose only server is its admin server (the processor, the
writers, the ledger): listed in serverTls.components, that server speaks TLS. */}}
{{- define "pulse.adminOnly" -}}
{{- if has (default .c.name .c.live) (list "processor" "writer-clickhouse" "writer-parquet" "ledger") }}true{{ end -}}
{{- end -}}

{{/* "true" when a component's admin port speaks TLS: listed, and serverTls.admin or a
component with only an admin server. */}}
{{- define "pulse.adminTlsOn" -}}
{{- if and (include "pulse.serverTlsOn" .) (or .root.Values.serverTls.admin (include "pulse.adminOnly" .)) }}true{{ end -}}
{{- end -}}

{{/* "true" when a component's HTTP/gRPC ports require client certificates of
serverTls.clientCaSecret: listed, not admin-only, and not the schema registry (its clients,
ingest, the processor and the schemas Job, have no client certificate to present). */}}
{{- define "pulse.clientCaOn" -}}
{{- if and (include "pulse.serverTlsOn" .) .root.Values.serverTls.clientCaSecret (not (include "pulse.adminOnly" .)) (ne .c.name "schema-registry") }}true{{ end -}}
{{- end -}}

{{/* "true" when this release's schema registry serves TLS (serverTls on, `schema-registry`
listed); its clients then get the https:// URL and the CA file. Call with $. */}}
{{- define "pulse.registryTlsOn" -}}
{{- $t := .Values.serverTls -}}
{{- if and $t.enabled (has "schema-registry" $t.components) }}true{{ end -}}
{{- end -}}

{{/* The URL of this release's schema registry: https:// when it serves TLS. Call with $. */}}
{{- define "pulse.registryURL" -}}
{{- $url := include "pulse.serviceURL" (list . "schema-registry" "http") -}}
{{- if include "pulse.registryTlsOn" . -}}
{{- $url | replace "http://" "https://" -}}
{{- else -}}
{{- $url -}}
{{- end -}}
{{- end -}}

{{- define "pulse.settings.serverTls" -}}
{{- $t := .root.Values.serverTls -}}
{{- if and (include "pulse.serverTlsOn" .) (not (include "pulse.adminOnly" .)) }}
PULSE_TLS_CERT_FILE: /etc/pulse/tls/tls.crt
PULSE_TLS_KEY_FILE: /etc/pulse/tls/tls.key
{{- if include "pulse.clientCaOn" . }}
PULSE_TLS_CLIENT_CA_FILE: {{ printf "/etc/pulse/tls-client-ca/%s" $t.clientCaKey }}
{{- end }}
{{- end }}
{{- if include "pulse.adminTlsOn" . }}
PULSE_ADMIN_TLS_CERT_FILE: /etc/pulse/tls/tls.crt
PULSE_ADMIN_TLS_KEY_FILE: /etc/pulse/tls/tls.key
{{- end }}
{{- end -}}

{{- define "pulse.serverTlsVolumeMounts" -}}
{{- if include "pulse.serverTlsOn" . }}
- name: server-tls
  mountPath: /etc/pulse/tls
  readOnly: true
{{- if include "pulse.clientCaOn" . }}
- name: server-tls-client-ca
  mountPath: /etc/pulse/tls-client-ca
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{- define "pulse.serverTlsVolumes" -}}
{{- $t := .root.Values.serverTls -}}
{{- if include "pulse.serverTlsOn" . }}
- name: server-tls
  secret:
    secretName: {{ required "serverTls.secret is required when serverTls.enabled is true" $t.secret }}
    defaultMode: 0440
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- if include "pulse.clientCaOn" . }}
- name: server-tls-client-ca
  secret:
    secretName: {{ $t.clientCaSecret }}
    items:
      - key: {{ $t.clientCaKey }}
        path: {{ $t.clientCaKey }}
{{- end }}
{{- end }}
{{- end -}}
