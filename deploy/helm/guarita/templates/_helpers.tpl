{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "guarita.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every resource name: RELEASE-guarita, or RELEASE when it already says guarita. */}}
{{- define "guarita.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "guarita.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "guarita.selectorLabels" -}}
app.kubernetes.io/name: {{ include "guarita.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "guarita.labels" -}}
helm.sh/chart: {{ include "guarita.chart" . }}
{{ include "guarita.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "guarita.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "guarita.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "guarita.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "guarita.keysSecretName" -}}
{{- default (printf "%s-keys" (include "guarita.fullname" .)) .Values.keys.existingSecret -}}
{{- end -}}

{{- define "guarita.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "guarita.fullname" .)) .Values.tls.existingSecret -}}
{{- end -}}

{{/* Paths inside the container. */}}
{{- define "guarita.configDir" -}}/etc/guarita/config{{- end -}}
{{- define "guarita.keysDir" -}}/etc/guarita/keys{{- end -}}
{{- define "guarita.tlsDir" -}}/etc/guarita/tls{{- end -}}
{{- define "guarita.dataDir" -}}/var/lib/guarita{{- end -}}

{{/* Refuse combinations that cannot work, with the value to change. */}}
{{- define "guarita.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.state.url) -}}
{{- fail "replicaCount > 1 needs a shared state database: set state.url (postgresql://USER@HOST:5432/DB)" -}}
{{- end -}}
{{- if and .Values.state.url (not (or (hasPrefix "postgresql://" .Values.state.url) (hasPrefix "postgres://" .Values.state.url))) -}}
{{- fail "state.url must be postgresql://USER@HOST:PORT/DB (the password goes in state.passwordSecret)" -}}
{{- end -}}
{{- if not (hasPrefix "s3://" .Values.recording.url) -}}
{{- fail "recording.url must be s3://BUCKET/PREFIX: pods are ephemeral, recordings need an object store" -}}
{{- end -}}
{{- if and (not .Values.keys.existingSecret) (not .Values.keys.generate) -}}
{{- fail "set keys.existingSecret (a Secret with the gateway's keys) or keys.generate=true" -}}
{{- end -}}
{{- if regexMatch "(?m)^\\s*\\[(gateway|state|recording)\\]" .Values.config -}}
{{- fail "config must not contain [gateway], [state] or [recording]: the chart writes them from values" -}}
{{- end -}}
{{- end -}}
