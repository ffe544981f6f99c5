{{/* Names ------------------------------------------------------------------------------- */}}
{{- define "latentedit.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "latentedit.fullname" -}}
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

{{- define "latentedit.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "latentedit.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "latentedit.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels: call with (dict "root" $ "component" "generator") */}}
{{- define "latentedit.selectorLabels" -}}
app.kubernetes.io/name: {{ include "latentedit.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{- define "latentedit.labels" -}}
helm.sh/chart: {{ include "latentedit.chart" .root }}
{{ include "latentedit.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: latentedit
{{- end -}}

{{/* Images: (dict "root" $ "component" "generator") ------------------------------------------ */}}
{{- define "latentedit.image" -}}
{{- $v := .root.Values -}}
{{- $tag := default .root.Chart.AppVersion $v.image.tag -}}
{{- if and (eq .component "generator") $v.generator.gpu.enabled -}}
{{- $tag = default (printf "%s-cuda" $tag) $v.image.cudaTag -}}
{{- end -}}
{{- printf "%s:%s" $v.image.repository $tag -}}
{{- end -}}

{{/* Where things are mounted -------------------------------------------------------------- */}}
{{- define "latentedit.configDir" -}}/etc/latentedit/config{{- end -}}
{{- define "latentedit.tlsDir" -}}/etc/latentedit/tls{{- end -}}
{{- define "latentedit.clientTlsDir" -}}/etc/latentedit/client-tls{{- end -}}
{{- define "latentedit.tokensDir" -}}/etc/latentedit/tokens{{- end -}}

{{- define "latentedit.tokensSecret" -}}
{{- default (printf "%s-tokens" (include "latentedit.fullname" .)) .Values.tokens.existingSecret -}}
{{- end -}}

{{- define "latentedit.claimName" -}}
{{- default (printf "%s-models" (include "latentedit.fullname" .)) .Values.modelRepository.existingClaim -}}
{{- end -}}

{{/* In-cluster names: (dict "root" $ "component" "generator") */}}
{{- define "latentedit.serviceHost" -}}
{{- printf "%s-%s.%s.svc" (include "latentedit.fullname" .root) .component .root.Release.Namespace -}}
{{- end -}}
{{- define "latentedit.headlessTarget" -}}
{{- printf "dns:///%s-%s-headless.%s.svc.%s:%v" (include "latentedit.fullname" .root) .component .root.Release.Namespace .root.Values.clusterDomain (get .root.Values.ports .component) -}}
{{- end -}}

{{/* The whole config.yaml, as YAML (keys of latentedit/config.py only) --------------------- */}}
{{- define "latentedit.config" -}}
{{- $v := .Values -}}
{{- $services := dict -}}
{{- range $name := list "generator" "scorer" "trainer" "editor" -}}
{{- $_ := set $services $name (dict "port" (get $v.ports $name) "grace_period_s" $v.gracePeriodSeconds) -}}
{{- end -}}
{{- $addresses := dict
      "generator" (include "latentedit.headlessTarget" (dict "root" . "component" "generator"))
      "scorer" (include "latentedit.headlessTarget" (dict "root" . "component" "scorer"))
      "trainer" (printf "%s:%v" (include "latentedit.serviceHost" (dict "root" . "component" "trainer")) $v.ports.trainer)
      "editor" (printf "%s:%v" (include "latentedit.serviceHost" (dict "root" . "component" "editor")) $v.ports.editor) -}}
{{- $generator := dict "device" "cpu" "backend" "auto" -}}
{{- if $v.generator.gpu.enabled -}}
{{- $generator = dict "device" "cuda" "backend" $v.generator.gpu.backend "cuda_fp16" $v.generator.gpu.fp16 -}}
{{- end -}}
{{- $generator = mergeOverwrite $generator (deepCopy $v.generator.config) -}}
{{- $security := dict "insecure" true -}}
{{- if $v.tls.enabled -}}
{{- $tls := include "latentedit.tlsDir" . -}}
{{- $tok := include "latentedit.tokensDir" . -}}
{{- $security = dict "insecure" false
      "cert_file" (printf "%s/tls.crt" $tls) "key_file" (printf "%s/tls.key" $tls) "ca_file" (printf "%s/ca.crt" $tls)
      "require_client_cert" $v.tls.mutual
      "tokens_file" (printf "%s/tokens.txt" $tok) "service_token_file" (printf "%s/service.token" $tok) -}}
{{- if $v.tls.clientSecretName -}}
{{- $ctls := include "latentedit.clientTlsDir" . -}}
{{- $_ := set $security "client_cert_file" (printf "%s/tls.crt" $ctls) -}}
{{- $_ := set $security "client_key_file" (printf "%s/tls.key" $ctls) -}}
{{- end -}}
{{- end -}}
{{- $observability := dict
      "metrics_port" (ternary $v.metrics.port 0 $v.metrics.enabled)
      "otlp_endpoint" $v.otel.endpoint
      "trace_sample_ratio" $v.otel.sampleRatio
      "json_logs" $v.logging.json -}}
{{- $config := dict
      "repository" $v.modelRepository.mountPath
      "services" $services
      "addresses" $addresses
      "generator" $generator
      "scorer" (deepCopy $v.scorer.config)
      "trainer" (deepCopy $v.trainer.config)
      "editor" (deepCopy $v.editor.config)
      "security" $security
      "observability" $observability -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Validation of values that cannot work ------------------------------------------------- */}}
{{- define "latentedit.validate" -}}
{{- $v := .Values -}}
{{- if not (has $v.trainer.jobStore (list "sqlite" "postgres")) -}}
{{- fail (printf "trainer.jobStore must be sqlite or postgres, not %q" $v.trainer.jobStore) -}}
{{- end -}}
{{- if and (eq $v.trainer.jobStore "sqlite") (ne (int $v.trainer.replicas) 1) -}}
{{- fail (printf "trainer.replicas is %v but trainer.jobStore sqlite allows exactly one trainer (one SQLite writer); use trainer.jobStore: postgres for several" $v.trainer.replicas) -}}
{{- end -}}
{{- if and (eq $v.trainer.jobStore "postgres") (not $v.trainer.postgres.dsnSecret.name) -}}
{{- fail "trainer.jobStore postgres needs trainer.postgres.dsnSecret.name (a Secret holding the DSN)" -}}
{{- end -}}
{{- if and $v.tls.enabled (not $v.tls.secretName) -}}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt)" -}}
{{- end -}}
{{- if not (has $v.generator.gpu.backend (list "auto" "torch" "tensorrt" "onnxruntime")) -}}
{{- fail (printf "generator.gpu.backend must be auto, torch, tensorrt or onnxruntime, not %q" $v.generator.gpu.backend) -}}
{{- end -}}
{{- end -}}

{{/* Probes: native gRPC without TLS; over TLS an exec probe (the kubelet's gRPC probe speaks
     plaintext only). (dict "root" $ "component" "generator" "service" "" "settings" .Values.probes.readiness) */}}
{{- define "latentedit.probe" -}}
{{- $port := get .root.Values.ports .component -}}
{{- if .root.Values.tls.enabled }}
exec:
  command: ["python", "{{ include "latentedit.configDir" .root }}/health_probe.py", "{{ $port }}", "{{ .service }}"]
{{- else }}
grpc:
  port: {{ $port }}
  service: {{ .service | quote }}
{{- end }}
{{ toYaml .settings }}
{{- end -}}

{{/* The pod spec every service shares: (dict "root" $ "component" "generator") ---------------- */}}
{{- define "latentedit.podSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $c := .component -}}
{{- $s := get $v $c -}}
{{- $gpu := and (eq $c "generator") $v.generator.gpu.enabled -}}
{{- $port := get $v.ports $c -}}
{{- $mountsClientTls := and $v.tls.enabled $v.tls.clientSecretName (or (has $c (list "editor" "trainer")) $v.tls.mutual) -}}
serviceAccountName: {{ include "latentedit.serviceAccountName" $root }}
automountServiceAccountToken: false
enableServiceLinks: false
terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
{{- $nodeSelector := $s.nodeSelector -}}
{{- $tolerations := $s.tolerations -}}
{{- if $gpu -}}
{{- $nodeSelector = merge (deepCopy $s.nodeSelector) $v.generator.gpu.nodeSelector -}}
{{- $tolerations = concat $s.tolerations $v.generator.gpu.tolerations -}}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $s.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: {{ $c }}
    image: {{ include "latentedit.image" . | quote }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    args: ["--config", "{{ include "latentedit.configDir" $root }}/config.yaml", "serve", "{{ $c }}"]
    ports:
      - {name: grpc, containerPort: {{ $port }}, protocol: TCP}
      {{- if $v.metrics.enabled }}
      - {name: metrics, containerPort: {{ $v.metrics.port }}, protocol: TCP}
      {{- end }}
    env:
      - {name: HOME, value: /tmp}
      - {name: TMPDIR, value: /tmp}
      - {name: XDG_CACHE_HOME, value: /tmp/.cache}
      - {name: PYTHONDONTWRITEBYTECODE, value: "1"}
      {{- if $v.tls.enabled }}
      - {name: LATENTEDIT_PROBE_SERVER_NAME, value: {{ include "latentedit.serviceHost" . | quote }}}
      {{- end }}
      {{- if and (eq $c "trainer") (eq $v.trainer.jobStore "postgres") }}
      - {name: {{ $v.trainer.postgres.storeEnv }}, value: postgres}
      - name: {{ $v.trainer.postgres.dsnEnv }}
        valueFrom:
          secretKeyRef: {name: {{ $v.trainer.postgres.dsnSecret.name }}, key: {{ $v.trainer.postgres.dsnSecret.key }}}
      {{- end }}
    readinessProbe:
      {{- include "latentedit.probe" (dict "root" $root "component" $c "service" "" "settings" $v.probes.readiness) | trim | nindent 6 }}
    livenessProbe:
      {{- include "latentedit.probe" (dict "root" $root "component" $c "service" "liveness" "settings" $v.probes.liveness) | trim | nindent 6 }}
    startupProbe:
      {{- include "latentedit.probe" (dict "root" $root "component" $c "service" "" "settings" $v.probes.startup) | trim | nindent 6 }}
    {{- $resources := deepCopy $s.resources -}}
    {{- if $gpu -}}
    {{- $resources = deepCopy $v.generator.gpu.resources -}}
    {{- $limits := default (dict) $resources.limits -}}
    {{- $_ := set $limits $v.generator.gpu.resourceName $v.generator.gpu.count -}}
    {{- $_ := set $resources "limits" $limits -}}
    {{- end }}
    resources:
      {{- toYaml $resources | nindent 6 }}
    securityContext:
      {{- toYaml $v.securityContext | nindent 6 }}
    volumeMounts:
      - {name: config, mountPath: {{ include "latentedit.configDir" $root }}, readOnly: true}
      - {name: models, mountPath: {{ $v.modelRepository.mountPath }}}
      - {name: tmp, mountPath: /tmp}
      {{- if and (eq $c "trainer") (eq $v.trainer.jobStore "sqlite") }}
      - {name: jobs, mountPath: {{ $v.modelRepository.mountPath }}/.jobs}
      {{- end }}
      {{- if $v.tls.enabled }}
      - {name: tls, mountPath: {{ include "latentedit.tlsDir" $root }}, readOnly: true}
      - {name: tokens, mountPath: {{ include "latentedit.tokensDir" $root }}, readOnly: true}
      {{- end }}
      {{- if $mountsClientTls }}
      - {name: client-tls, mountPath: {{ include "latentedit.clientTlsDir" $root }}, readOnly: true}
      {{- end }}
volumes:
  - name: config
    configMap: {name: {{ include "latentedit.fullname" $root }}-config}
  - name: models
    persistentVolumeClaim: {claimName: {{ include "latentedit.claimName" $root }}}
  - name: tmp
    emptyDir: {sizeLimit: {{ $v.tmpVolume.sizeLimit }}}
  {{- if $v.tls.enabled }}
  - name: tls
    secret: {secretName: {{ $v.tls.secretName }}, defaultMode: 0440}
  - name: tokens
    secret:
      secretName: {{ include "latentedit.tokensSecret" $root }}
      defaultMode: 0440
      items:
        - {key: tokens.txt, path: tokens.txt}
        {{- if has $c (list "editor" "trainer") }}
        - {key: service.token, path: service.token}
        {{- end }}
  {{- end }}
  {{- if $mountsClientTls }}
  - name: client-tls
    secret: {secretName: {{ $v.tls.clientSecretName }}, defaultMode: 0440}
  {{- end }}
{{- end -}}
