{{/* Chart name. */}}
{{- define "cohort.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; component names are appended, so keep it at most 40 characters. */}}
{{- define "cohort.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cohort.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels. Call with (dict "root" $ "component" "proxy"). */}}
{{- define "cohort.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cohort.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Common labels. Call with (dict "root" $ "component" "proxy"). */}}
{{- define "cohort.labels" -}}
{{ include "cohort.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Values.image.tag | default .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: cohort
helm.sh/chart: {{ include "cohort.chart" .root }}
{{- end }}

{{/* The image every container runs. */}}
{{- define "cohort.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/* Name of a component's objects. Call with (dict "root" $ "component" "proxy"). */}}
{{- define "cohort.componentName" -}}
{{- printf "%s-%s" (include "cohort.fullname" .root) .component }}
{{- end }}

{{/* host:port of a component's Service inside the cluster. */}}
{{- define "cohort.address" -}}
{{- printf "%s.%s.svc:%v" (include "cohort.componentName" .) .root.Release.Namespace .port }}
{{- end }}

{{/* True when the services use SQLite (the default): one file per service on its own volume. */}}
{{- define "cohort.sqliteDefault" -}}
{{- if and (not .Values.database.existingSecret) (or (not .Values.database.url) (hasPrefix "sqlite:" .Values.database.url)) }}true{{ end }}
{{- end }}

{{/* Name of the Secret that holds the database URL(s). */}}
{{- define "cohort.databaseSecret" -}}
{{- .Values.database.existingSecret | default (printf "%s-database" (include "cohort.fullname" .)) }}
{{- end }}

{{/* Key of a component's URL in that Secret. Call with (dict "root" $ "component" "proxy"). */}}
{{- define "cohort.databaseKey" -}}
{{- if .root.Values.database.existingSecret }}{{ .root.Values.database.secretKey }}{{ else }}{{ .component }}{{ end }}
{{- end }}

{{/*
One server service: Deployment. Call with a dict:
  root, component, binary, port, values (the component's values),
  database (bool), persistent (bool: a PVC for /var/lib/cohort), env (list), serviceAccount (name or ""),
  replicas, tlsSecret (name)
*/}}
{{- define "cohort.deployment" -}}
{{- $root := .root }}
{{- $v := .values }}
{{- $ctx := dict "root" $root "component" .component }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "cohort.componentName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "cohort.labels" $ctx | nindent 4 }}
spec:
  replicas: {{ .replicas | default 1 }}
  revisionHistoryLimit: 5
  {{- if le (int (.replicas | default 1)) 1 }}
  # One writer at a time: the old pod stops before the new one opens the store.
  strategy:
    type: Recreate
  {{- end }}
  selector:
    matchLabels:
      {{- include "cohort.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "cohort.labels" $ctx | nindent 8 }}
      {{- $annotations := deepCopy ($root.Values.podAnnotations | default dict) }}
      {{- if $root.Values.metrics.enabled }}
      {{- $_ := set $annotations "prometheus.io/scrape" "true" }}
      {{- $_ := set $annotations "prometheus.io/port" (toString $root.Values.metrics.port) }}
      {{- $_ := set $annotations "prometheus.io/path" "/metrics" }}
      {{- end }}
      {{- with $annotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- if .serviceAccount }}
      serviceAccountName: {{ .serviceAccount }}
      automountServiceAccountToken: true
      {{- else }}
      automountServiceAccountToken: false
      {{- end }}
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- with $root.Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "cohort.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["/usr/local/bin/{{ .binary }}"]
          args: ["--listen", "0.0.0.0:{{ .port }}"]
          ports:
            - name: grpc
              containerPort: {{ .port }}
              protocol: TCP
            - name: health
              containerPort: {{ $root.Values.healthPort }}
              protocol: TCP
            {{- if $root.Values.metrics.enabled }}
            - name: metrics
              containerPort: {{ $root.Values.metrics.port }}
              protocol: TCP
            {{- end }}
          env:
            - name: COHORT_HEALTH_LISTEN
              value: "0.0.0.0:{{ $root.Values.healthPort }}"
            {{- if $root.Values.metrics.enabled }}
            - name: COHORT_METRICS_LISTEN
              value: "0.0.0.0:{{ $root.Values.metrics.port }}"
            {{- end }}
            - name: COHORT_LOG_FORMAT
              value: {{ $root.Values.logFormat | quote }}
            {{- with include "cohort.otelEnv" (dict "root" $root "service" .binary) }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- if .database }}
            - name: COHORT_DATABASE_URL
              valueFrom:
                secretKeyRef:
                  name: {{ include "cohort.databaseSecret" $root }}
                  key: {{ include "cohort.databaseKey" $ctx }}
            {{- end }}
            {{- if $root.Values.tls.enabled }}
            - name: COHORT_TLS_CERT
              value: {{ printf "%s/tls.crt" $root.Values.tls.mountPath | quote }}
            - name: COHORT_TLS_KEY
              value: {{ printf "%s/tls.key" $root.Values.tls.mountPath | quote }}
            - name: COHORT_TLS_CA
              value: {{ printf "%s/ca.crt" $root.Values.tls.mountPath | quote }}
            {{- end }}
            {{- with .env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          livenessProbe:
            grpc:
              port: {{ $root.Values.healthPort }}
            {{- toYaml $root.Values.probes.liveness | nindent 12 }}
          readinessProbe:
            grpc:
              port: {{ $root.Values.healthPort }}
            {{- toYaml $root.Values.probes.readiness | nindent 12 }}
          {{- with $v.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: data
              mountPath: /var/lib/cohort
            - name: tmp
              mountPath: /tmp
            {{- if $root.Values.tls.enabled }}
            - name: tls
              mountPath: {{ $root.Values.tls.mountPath }}
              readOnly: true
            {{- end }}
      volumes:
        - name: data
          {{- if .persistent }}
          persistentVolumeClaim:
            claimName: {{ include "cohort.componentName" $ctx }}-data
          {{- else }}
          emptyDir: {}
          {{- end }}
        - name: tmp
          emptyDir:
            sizeLimit: 256Mi
        {{- if $root.Values.tls.enabled }}
        - name: tls
          secret:
            secretName: {{ required (printf "tls.secrets names the TLS Secret of %s" .component) .tlsSecret }}
            defaultMode: 0440
            items:
              - {key: tls.crt, path: tls.crt}
              - {key: tls.key, path: tls.key}
              - {key: ca.crt, path: ca.crt}
        {{- end }}
{{- end }}

{{/* A component's data PVC. Call with (dict "root" $ "component" "x" "size" "1Gi"). */}}
{{- define "cohort.pvc" -}}
{{- $ctx := dict "root" .root "component" .component }}
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {{ include "cohort.componentName" $ctx }}-data
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "cohort.labels" $ctx | nindent 4 }}
  {{- if .root.Values.persistence.keep }}
  annotations:
    helm.sh/resource-policy: keep
  {{- end }}
spec:
  accessModes: [{{ .root.Values.persistence.accessMode }}]
  {{- with .root.Values.persistence.storageClass }}
  storageClassName: {{ . | quote }}
  {{- end }}
  resources:
    requests:
      storage: {{ .size }}
{{- end }}

{{/* A component's ClusterIP Service. Call with (dict "root" $ "component" "x" "port" 7001). */}}
{{- define "cohort.service" -}}
{{- $ctx := dict "root" .root "component" .component }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "cohort.componentName" $ctx }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "cohort.labels" $ctx | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "cohort.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ .port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
{{- end }}

{{/*
The OTEL_* variables of a container when otel.endpoint is set (nothing otherwise), as a YAML
list. Call with (dict "root" $ "service" "proxy"): the service name its traces carry.
*/}}
{{- define "cohort.otelEnv" -}}
{{- $o := .root.Values.otel | default dict }}
{{- if $o.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $o.endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .service | quote }}
{{- with $o.sampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ . | quote }}
{{- end }}
{{- if not (kindIs "invalid" $o.samplerArg) }}{{ if ne (toString $o.samplerArg) "" }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $o.samplerArg | toString | quote }}
{{- end }}{{ end }}
{{- with $o.resourceAttributes }}
{{- $attrs := . }}
{{- $pairs := list }}
{{- range $k := keys $attrs | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $k (toString (get $attrs $k))) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $pairs | quote }}
{{- end }}
{{- end }}
{{- end }}
