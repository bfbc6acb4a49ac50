# ElastiCache Redis: a replication group over the three zones (automatic failover), TLS in transit, AUTH
# token kept in Secrets Manager, encryption at rest with the data key, logs to CloudWatch. It holds the
# Redis sink's windows and update channel, WebSocket sessions, rate-limit buckets and stream leases, and
# the GCS fault-tolerance state of both Ray clusters (separate key namespaces).

resource "random_password" "redis_auth" {
  length           = 48
  special          = true
  override_special = "!&#$^<>-"
}

resource "aws_secretsmanager_secret" "redis_auth" {
  # checkov:skip=CKV2_AWS_57: ElastiCache AUTH tokens rotate through modify-replication-group, not a Secrets Manager rotation lambda
  name_prefix = "${var.name}/redis-auth-"
  kms_key_id  = aws_kms_key.data.arn
  tags        = local.tags
}

resource "aws_secretsmanager_secret_version" "redis_auth" {
  secret_id     = aws_secretsmanager_secret.redis_auth.id
  secret_string = random_password.redis_auth.result
}

resource "aws_elasticache_subnet_group" "this" {
  name       = "${var.name}-redis"
  subnet_ids = aws_subnet.private[*].id
  tags       = local.tags
}

resource "aws_elasticache_replication_group" "this" {
  replication_group_id       = "${var.name}-redis"
  description                = "raystream ${var.name}: sinks, live updates, rate limits, GCS fault tolerance"
  engine                     = "redis"
  engine_version             = "7.1"
  node_type                  = var.redis_node_type
  num_cache_clusters         = length(var.azs)
  automatic_failover_enabled = true
  multi_az_enabled           = true
  port                       = 6379
  subnet_group_name          = aws_elasticache_subnet_group.this.name
  security_group_ids         = [aws_security_group.store["redis"].id]
  at_rest_encryption_enabled = true
  kms_key_id                 = aws_kms_key.data.arn
  transit_encryption_enabled = true
  auth_token                 = random_password.redis_auth.result
  snapshot_retention_limit   = 7
  auto_minor_version_upgrade = true

  log_delivery_configuration {
    destination      = aws_cloudwatch_log_group.redis.name
    destination_type = "cloudwatch-logs"
    log_format       = "json"
    log_type         = "slow-log"
  }

  tags = local.tags
}
