# Log groups (encrypted, retained at least a year) and the alarms an operator is paged for, on an
# encrypted SNS topic. Pipeline-level alerts (lag, watermark, checkpoints) are Prometheus rules.

resource "aws_cloudwatch_log_group" "flow_logs" {
  name              = "/aws/vpc/${var.name}/flow-logs"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.logs.arn
  tags              = local.tags
}

resource "aws_cloudwatch_log_group" "eks" {
  name              = "/aws/eks/${var.name}/cluster" # the name EKS writes its control-plane logs to
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.logs.arn
  tags              = local.tags
}

resource "aws_cloudwatch_log_group" "msk" {
  name              = "/aws/msk/${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.logs.arn
  tags              = local.tags
}

resource "aws_cloudwatch_log_group" "redis" {
  name              = "/aws/elasticache/${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.logs.arn
  tags              = local.tags
}

resource "aws_sns_topic" "alarms" {
  name              = "${var.name}-alarms"
  kms_master_key_id = aws_kms_key.logs.arn
  tags              = local.tags
}

resource "aws_sns_topic_subscription" "alarm_emails" {
  for_each  = toset(var.alarm_emails)
  topic_arn = aws_sns_topic.alarms.arn
  protocol  = "email"
  endpoint  = each.value
}

locals {
  alarms = {
    rds-cpu = {
      namespace = "AWS/RDS", metric = "CPUUtilization", stat = "Average", threshold = 80, op = "GreaterThanThreshold",
      dims      = { DBInstanceIdentifier = aws_db_instance.this.identifier }, what = "PostgreSQL CPU above 80 % for 15 minutes"
    }
    rds-storage = {
      namespace = "AWS/RDS", metric = "FreeStorageSpace", stat = "Minimum", threshold = 10737418240, op = "LessThanThreshold",
      dims      = { DBInstanceIdentifier = aws_db_instance.this.identifier }, what = "PostgreSQL free storage below 10 GiB"
    }
    redis-cpu = {
      namespace = "AWS/ElastiCache", metric = "EngineCPUUtilization", stat = "Average", threshold = 75, op = "GreaterThanThreshold",
      dims      = { ReplicationGroupId = aws_elasticache_replication_group.this.id }, what = "Redis engine CPU above 75 %"
    }
    redis-memory = {
      namespace = "AWS/ElastiCache", metric = "DatabaseMemoryUsagePercentage", stat = "Maximum", threshold = 85, op = "GreaterThanThreshold",
      dims      = { ReplicationGroupId = aws_elasticache_replication_group.this.id }, what = "Redis memory above 85 %"
    }
    msk-disk = {
      namespace = "AWS/Kafka", metric = "KafkaDataLogsDiskUsed", stat = "Maximum", threshold = 80, op = "GreaterThanThreshold",
      dims      = { "Cluster Name" = aws_msk_cluster.this.cluster_name }, what = "a broker's data disk above 80 %"
    }
  }
}

resource "aws_cloudwatch_metric_alarm" "this" {
  for_each            = local.alarms
  alarm_name          = "${var.name}-${each.key}"
  alarm_description   = each.value.what
  namespace           = each.value.namespace
  metric_name         = each.value.metric
  statistic           = each.value.stat
  threshold           = each.value.threshold
  comparison_operator = each.value.op
  dimensions          = each.value.dims
  period              = 300
  evaluation_periods  = 3
  treat_missing_data  = "breaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]
  tags                = local.tags
}
