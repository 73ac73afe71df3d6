// TypeDoc plugin for `npm run docs:check`: every option states its default. An option is an
// optional property of an exported interface (or object type alias) whose name ends in "Options";
// its doc comment must have a @defaultValue tag or say "default" in its text. Reported as
// validation warnings, which docs:check turns into errors (--treatWarningsAsErrors).
import { Application, Comment, ReflectionKind } from 'typedoc';

/** @param {import('typedoc').Application} app */
export function load(app) {
  app.on(Application.EVENT_VALIDATE_PROJECT, (project) => {
    const kinds = ReflectionKind.Interface | ReflectionKind.TypeAlias;
    for (const owner of project.getReflectionsByKind(kinds)) {
      if (!owner.name.endsWith('Options')) continue;
      const properties = owner.children ?? owner.type?.declaration?.children ?? [];
      for (const property of properties) {
        if (!property.kindOf(ReflectionKind.Property) || !property.flags.isOptional) continue;
        const comment = property.comment ?? property.getSignature?.comment;
        const text = comment ? Comment.combineDisplayParts(comment.summary) : '';
        const tagged = comment?.blockTags.some((tag) => tag.tag === '@defaultValue' || tag.tag === '@default');
        if (!tagged && !/\bdefault/i.test(text)) {
          const where = property.sources?.[0] ? ` (${property.sources[0].fileName}:${property.sources[0].line})` : '';
          app.logger.warn(`${owner.name}.${property.name}${where} is an option without a stated default: ` +
            'add a @defaultValue tag or say "default ..." in its comment');
        }
      }
    }
  });
}
