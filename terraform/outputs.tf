output "cluster_name" {
  description = "EKS cluster name (aws eks update-kubeconfig --name ...)."
  value       = aws_eks_cluster.this.name
}

output "cluster_endpoint" {
  description = "Private endpoint of the EKS API server."
  value       = aws_eks_cluster.this.endpoint
}

output "cluster_certificate_authority_data" {
  description = "Base64 CA certificate of the EKS API server (for the helm/kubernetes providers)."
  value       = aws_eks_cluster.this.certificate_authority[0].data
}

output "oidc_provider_arn" {
  description = "ARN of the cluster's OIDC provider (IRSA)."
  value       = aws_iam_openid_connect_provider.eks.arn
}

output "raystream_role_arn" {
  description = "IRSA role for the raystream ServiceAccount: cluster/overlays/*/kustomization.yaml, eks.amazonaws.com/role-arn."
  value       = aws_iam_role.raystream.arn
}

output "data_bucket" {
  description = "Bucket for checkpoints/, windows/ and archive/: the ConfigMap raystream-endpoints, CHECKPOINT_BUCKET."
  value       = aws_s3_bucket.data.bucket
}

output "msk_bootstrap_brokers_iam" {
  description = "MSK bootstrap servers for IAM auth over TLS: the ConfigMap raystream-endpoints, KAFKA_BOOTSTRAP."
  value       = aws_msk_cluster.this.bootstrap_brokers_sasl_iam
}

output "postgres_endpoint" {
  description = "PostgreSQL host:port (the DSN in the Secret raystream-secrets, PG_DSN)."
  value       = aws_db_instance.this.endpoint
}

output "postgres_master_secret_arn" {
  description = "Secrets Manager secret holding the PostgreSQL master password (create the application role with it)."
  value       = aws_db_instance.this.master_user_secret[0].secret_arn
}

output "redis_endpoint" {
  description = "Redis primary endpoint (rediss://, in REDIS_URL and the RayCluster gcsFaultToleranceOptions.redisAddress)."
  value       = aws_elasticache_replication_group.this.primary_endpoint_address
}

output "redis_auth_secret_arn" {
  description = "Secrets Manager secret holding the Redis AUTH token (the Secrets raystream-secrets and raystream-gcs-redis)."
  value       = aws_secretsmanager_secret.redis_auth.arn
}

output "alarm_topic_arn" {
  description = "SNS topic the CloudWatch alarms notify."
  value       = aws_sns_topic.alarms.arn
}

output "overlay_values" {
  description = "Everything docs/deploy.md puts into a cluster/ overlay and its Secrets, in one map."
  value = {
    cluster_name  = aws_eks_cluster.this.name
    role_arn      = aws_iam_role.raystream.arn
    data_bucket   = aws_s3_bucket.data.bucket
    kafka         = aws_msk_cluster.this.bootstrap_brokers_sasl_iam
    postgres      = aws_db_instance.this.endpoint
    redis         = aws_elasticache_replication_group.this.primary_endpoint_address
    redis_secret  = aws_secretsmanager_secret.redis_auth.arn
    postgres_user = aws_db_instance.this.master_user_secret[0].secret_arn
  }
}
